package sdserve_test

// Live adapter tests against a running sdserve, started by tests/clients (pytest). They skip unless
// SDSERVE_ADDR and SDSERVE_ADAPTER_CASES (the harness's JSON file: an unknown adapter's name and the
// field the server names for it, and, when the checkout ships the shapes LoRA, a reference request
// with it in proto3 JSON, the image bytes and the resolved adapters the Python stubs got) are set.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"regexp"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	sdservev1 "github.com/sdserve/sdserve/clients/go/gen/sdserve/v1"
	"github.com/sdserve/sdserve/clients/go/sdserve"
)

type adapterCase struct {
	Missing  string            `json:"missing"`
	Field    string            `json:"field"`
	Lora     string            `json:"lora"`
	Prompt   string            `json:"prompt"`
	Request  json.RawMessage   `json:"request"`
	Images   []expectedImage   `json:"images"`
	Adapters []json.RawMessage `json:"adapters"`
}

func loadAdapters(t *testing.T) adapterCase {
	t.Helper()
	path := os.Getenv("SDSERVE_ADAPTER_CASES")
	if path == "" {
		t.Skip("SDSERVE_ADAPTER_CASES is not set: run through pytest tests/clients, which starts a server")
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var c adapterCase
	if err := json.Unmarshal(raw, &c); err != nil {
		t.Fatal(err)
	}
	return c
}

func TestLiveAdapterNotFound(t *testing.T) {
	c := live(t)
	ac := loadAdapters(t)
	req := &sdservev1.GenerateRequest{Params: &sdservev1.GenerationParams{
		Prompt: "a red circle", Steps: 2, Adapters: []*sdservev1.AdapterRef{{Name: ac.Missing}},
	}}
	_, err := c.Generate(context.Background(), req)
	e, ok := sdserve.AsError(err)
	if !ok || e.Code != codes.NotFound {
		t.Fatalf("got %v, want NotFound", err)
	}
	if _, named := e.Violation(ac.Field); !named && !strings.Contains(e.Message, ac.Field) {
		t.Errorf("NotFound does not name %s: %v %v", ac.Field, e.Message, e.FieldViolations)
	}
}

var sha256Hex = regexp.MustCompile(`^[0-9a-f]{64}$`)

func TestLiveAdapterLoRA(t *testing.T) {
	c := live(t)
	ac := loadAdapters(t)
	if ac.Lora == "" {
		t.Skip("the shapes LoRA (models/adapters) is not in this checkout")
	}
	// The reference request, written the way a caller would.
	req := &sdservev1.GenerateRequest{Params: &sdservev1.GenerationParams{
		Model:    "shapes",
		Prompt:   ac.Prompt,
		Steps:    8,
		Seed:     proto.Uint64(5),
		Adapters: []*sdservev1.AdapterRef{sdserve.Adapter(ac.Lora, 1)},
	}}
	ref := &sdservev1.GenerateRequest{}
	if err := protojson.Unmarshal(ac.Request, ref); err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(req, ref) {
		t.Fatalf("request differs from the reference:\n%v\n%v", req, ref)
	}
	res, err := c.Generate(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Images) != len(ac.Images) {
		t.Fatalf("%d images, want %d", len(res.Images), len(ac.Images))
	}
	for i, img := range res.Images {
		sum := sha256.Sum256(img.GetData())
		if got := hex.EncodeToString(sum[:]); got != ac.Images[i].SHA256 {
			t.Errorf("image %d: sha256 %s, want %s", i, got, ac.Images[i].SHA256)
		}
	}
	var want []*sdservev1.ResolvedAdapter
	for _, raw := range ac.Adapters {
		a := &sdservev1.ResolvedAdapter{}
		if err := protojson.Unmarshal(raw, a); err != nil {
			t.Fatal(err)
		}
		want = append(want, a)
	}
	for what, got := range map[string][]*sdservev1.ResolvedAdapter{
		"started": res.Started.GetAdapters(), "result": res.Adapters, "parameters": res.Parameters.GetAdapters(),
	} {
		if len(got) != 1 || len(want) != 1 {
			t.Fatalf("%s: adapters %v, want %v", what, got, want)
		}
		if !proto.Equal(got[0], want[0]) {
			t.Errorf("%s: adapter %v, want %v", what, got[0], want[0])
		}
		a := got[0]
		if a.GetName() != ac.Lora || a.GetKind() != sdservev1.AdapterKind_ADAPTER_KIND_LORA || a.GetScale() != 1 ||
			!sha256Hex.MatchString(a.GetSha256()) || a.GetToken() != "" {
			t.Errorf("%s: adapter %v", what, a)
		}
	}
}
