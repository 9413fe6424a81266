package sdserve_test

// Live tests against a running sdserve, started by tests/clients (pytest). They skip unless
// SDSERVE_ADDR (host:port) and SDSERVE_CASES (the harness's JSON file: each case's request in
// proto3 JSON and the image bytes the Python stubs got for it) are set.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"os"
	"reflect"
	"sort"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	sdservev1 "github.com/sdserve/sdserve/clients/go/gen/sdserve/v1"
	"github.com/sdserve/sdserve/clients/go/sdserve"
)

type expectedImage struct {
	SHA256  string `json:"sha256"`
	DataB64 string `json:"data_b64"`
}

type liveCase struct {
	RPC     string          `json:"rpc"`
	Request json.RawMessage `json:"request"`
	Images  []expectedImage `json:"images"`
}

func live(t *testing.T) *sdserve.Client {
	t.Helper()
	addr := os.Getenv("SDSERVE_ADDR")
	if addr == "" {
		t.Skip("SDSERVE_ADDR is not set: run through pytest tests/clients, which starts a server")
	}
	c, err := sdserve.Dial(context.Background(), addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func loadCases(t *testing.T) map[string]liveCase {
	t.Helper()
	path := os.Getenv("SDSERVE_CASES")
	if path == "" {
		t.Fatal("SDSERVE_CASES is not set")
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Cases map[string]liveCase `json:"cases"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	return doc.Cases
}

// long is a request that would run for minutes if nothing stopped it.
func long() *sdservev1.GenerateRequest {
	return &sdservev1.GenerateRequest{Params: &sdservev1.GenerationParams{
		Prompt: "long", Width: 512, Height: 512, Steps: 150, Seed: proto.Uint64(3),
	}}
}

// assertServerFree fails if the stopped request still holds the worker: this one would then
// wait minutes and hit its deadline.
func assertServerFree(t *testing.T, c *sdserve.Client) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	res, err := c.Generate(ctx, &sdservev1.GenerateRequest{Params: &sdservev1.GenerationParams{
		Prompt: "after", Steps: 2, Seed: proto.Uint64(9),
	}})
	if err != nil {
		t.Fatalf("follow-up request: %v", err)
	}
	if len(res.Images) != 1 {
		t.Fatalf("follow-up request: %d images", len(res.Images))
	}
}

func TestLiveExactBytes(t *testing.T) {
	c := live(t)
	cases := loadCases(t)
	names := make([]string, 0, len(cases))
	for name := range cases {
		names = append(names, name)
	}
	sort.Strings(names)
	if !reflect.DeepEqual(names, []string{"edit", "generate", "inpaint"}) {
		t.Fatalf("cases: %v", names)
	}
	ctx := context.Background()
	info, err := c.GetServerInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range names {
		lc := cases[name]
		var (
			res *sdserve.Result
			err error
		)
		switch lc.RPC {
		case "generate":
			req := &sdservev1.GenerateRequest{}
			if err = protojson.Unmarshal(lc.Request, req); err == nil {
				res, err = c.Generate(ctx, req)
			}
		case "edit":
			req := &sdservev1.EditRequest{}
			if err = protojson.Unmarshal(lc.Request, req); err == nil {
				res, err = c.Edit(ctx, req)
			}
		case "inpaint":
			req := &sdservev1.InpaintRequest{}
			if err = protojson.Unmarshal(lc.Request, req); err == nil {
				res, err = c.Inpaint(ctx, req)
			}
		default:
			t.Fatalf("%s: unknown rpc %q", name, lc.RPC)
		}
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		// The replica that served it, in the result and the started event alike: this server's.
		if res.Replica == "" || res.Replica != info.GetReplica() || res.Started.GetReplica() != res.Replica {
			t.Errorf("%s: replica %q, started on %q, server %q", name, res.Replica, res.Started.GetReplica(), info.GetReplica())
		}
		if len(res.Images) != len(lc.Images) {
			t.Fatalf("%s: %d images, want %d", name, len(res.Images), len(lc.Images))
		}
		for i, img := range res.Images {
			sum := sha256.Sum256(img.GetData())
			if got := hex.EncodeToString(sum[:]); got != lc.Images[i].SHA256 {
				t.Errorf("%s[%d]: sha256 %s, want %s", name, i, got, lc.Images[i].SHA256)
			}
			want, err := base64.StdEncoding.DecodeString(lc.Images[i].DataB64)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(img.GetData(), want) {
				t.Errorf("%s[%d]: bytes differ from the Python stubs' (%d vs %d bytes)", name, i, len(img.GetData()), len(want))
			}
			if img.GetFormat() != sdservev1.ImageFormat_IMAGE_FORMAT_PNG {
				t.Errorf("%s[%d]: format %v", name, i, img.GetFormat())
			}
			if res.Started == nil || len(res.Started.GetSeeds()) <= i || res.Started.GetSeeds()[i] != img.GetSeed() {
				t.Errorf("%s[%d]: seed %d not in started event %v", name, i, img.GetSeed(), res.Started)
			}
		}
		if res.Parameters.GetModel() == "" || res.RequestID == "" {
			t.Errorf("%s: missing metadata: %v %q", name, res.Parameters, res.RequestID)
		}
	}
}

func TestLiveProgressInOrder(t *testing.T) {
	c := live(t)
	ctx := context.Background()
	s, err := c.GenerateStream(ctx, &sdservev1.GenerateRequest{Params: &sdservev1.GenerationParams{
		Prompt: "progress", Steps: 3, Seed: proto.Uint64(5),
		Preview: &sdservev1.PreviewOptions{Mode: sdservev1.PreviewMode_PREVIEW_MODE_LATENT_RGB, EveryNSteps: 1},
	}})
	if err != nil {
		t.Fatal(err)
	}
	var kinds []string
	var steps []uint32
	for {
		e, err := s.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case e.Queued != nil:
			kinds = append(kinds, "queued")
		case e.Started != nil:
			kinds = append(kinds, "started")
		case e.Progress != nil:
			kinds = append(kinds, "progress")
			steps = append(steps, e.Progress.GetStep())
			if e.Progress.GetTotalSteps() != 3 {
				t.Errorf("total_steps %d, want 3", e.Progress.GetTotalSteps())
			}
			if len(e.Progress.GetPreviews()) != 1 || !bytes.HasPrefix(e.Progress.GetPreviews()[0].GetData(), []byte{0xff, 0xd8}) {
				t.Errorf("step %d: want one JPEG preview", e.Progress.GetStep())
			}
		case e.Result != nil:
			kinds = append(kinds, "result")
		}
	}
	if want := []string{"queued", "started", "progress", "progress", "progress", "result"}; !reflect.DeepEqual(kinds, want) {
		t.Errorf("events %v, want %v", kinds, want)
	}
	if !reflect.DeepEqual(steps, []uint32{1, 2, 3}) {
		t.Errorf("steps %v, want [1 2 3]", steps)
	}
	// The callback form sees the same order.
	var cbSteps []uint32
	_, err = c.Generate(ctx, &sdservev1.GenerateRequest{Params: &sdservev1.GenerationParams{
		Prompt: "progress", Steps: 2, Seed: proto.Uint64(5),
	}}, sdserve.OnEvent(func(e sdserve.Event) {
		if e.Progress != nil {
			cbSteps = append(cbSteps, e.Progress.GetStep())
		}
	}))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(cbSteps, []uint32{1, 2}) {
		t.Errorf("callback steps %v, want [1 2]", cbSteps)
	}
}

func TestLiveCancelMidStream(t *testing.T) {
	c := live(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s, err := c.GenerateStream(ctx, long())
	if err != nil {
		t.Fatal(err)
	}
	var steps []uint32
	var callErr error
	for {
		e, err := s.Recv()
		if err != nil {
			callErr = err
			break
		}
		if e.Result != nil {
			t.Fatal("got a result; the call should have been cancelled")
		}
		if e.Progress != nil {
			steps = append(steps, e.Progress.GetStep())
			cancel()
		}
	}
	e, ok := sdserve.AsError(callErr)
	if !ok || e.Code != codes.Canceled {
		t.Fatalf("got %v, want an *sdserve.Error with code Canceled", callErr)
	}
	if !reflect.DeepEqual(steps, []uint32{1}) {
		t.Errorf("progress steps before the cancel took effect: %v", steps)
	}
	assertServerFree(t, c)
}

func TestLiveDeadline(t *testing.T) {
	c := live(t)
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	_, err := c.Generate(ctx, long())
	e, ok := sdserve.AsError(err)
	if !ok || e.Code != codes.DeadlineExceeded {
		t.Fatalf("got %v, want an *sdserve.Error with code DeadlineExceeded", err)
	}
	assertServerFree(t, c)
}

func TestLiveInvalidArgument(t *testing.T) {
	c := live(t)
	_, err := c.Generate(context.Background(), &sdservev1.GenerateRequest{Params: &sdservev1.GenerationParams{
		Prompt: "bad", Width: 13, Seed: proto.Uint64(1),
	}})
	e, ok := sdserve.AsError(err)
	if !ok || e.Code != codes.InvalidArgument {
		t.Fatalf("got %v, want an *sdserve.Error with code InvalidArgument", err)
	}
	v, ok := e.Violation("params.width")
	if !ok {
		t.Fatalf("no params.width violation in %+v", e.FieldViolations)
	}
	if !strings.Contains(v.Description, "multiple of 8") {
		t.Errorf("description %q", v.Description)
	}
	if e.HasRetryDelay {
		t.Errorf("unexpected retry delay %v", e.RetryDelay)
	}
}

func TestLiveInfo(t *testing.T) {
	c := live(t)
	ctx := context.Background()
	models, err := c.ListModels(ctx)
	if err != nil {
		t.Fatal(err)
	}
	info, err := c.GetServerInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if models.GetDefaultModel() == "" || info.GetDefaultModel() != models.GetDefaultModel() {
		t.Errorf("default model %q vs %q", models.GetDefaultModel(), info.GetDefaultModel())
	}
	if info.GetLimits().GetMaxMessageBytes() != sdserve.DefaultMaxMessageBytes {
		t.Errorf("server max_message_bytes %d", info.GetLimits().GetMaxMessageBytes())
	}
}
