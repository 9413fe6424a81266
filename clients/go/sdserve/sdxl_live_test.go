package sdserve_test

// Live SDXL tests against a running sdserve with tiny SDXL base and refiner models, started by
// tests/clients (pytest). They skip unless SDSERVE_ADDR and SDSERVE_SDXL_CASES (the harness's JSON
// file: the models' names, the reference request in proto3 JSON, and the image bytes and denoising
// passes the Python stubs got for it) are set.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"reflect"
	"testing"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	sdservev1 "github.com/sdserve/sdserve/clients/go/gen/sdserve/v1"
	"github.com/sdserve/sdserve/clients/go/sdserve"
)

type sdxlCase struct {
	Base    string          `json:"base"`
	Refiner string          `json:"refiner"`
	Request json.RawMessage `json:"request"`
	Images  []expectedImage `json:"images"`
	Passes  []string        `json:"passes"`
}

func loadSDXL(t *testing.T) sdxlCase {
	t.Helper()
	path := os.Getenv("SDSERVE_SDXL_CASES")
	if path == "" {
		t.Skip("SDSERVE_SDXL_CASES is not set: run through pytest tests/clients, which starts a server with SDXL models")
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var c sdxlCase
	if err := json.Unmarshal(raw, &c); err != nil {
		t.Fatal(err)
	}
	return c
}

// sdxlRequest is the reference request, written the way a caller would.
func sdxlRequest(c sdxlCase) *sdservev1.GenerateRequest {
	return &sdservev1.GenerateRequest{Params: &sdservev1.GenerationParams{
		Model:            c.Base,
		Prompt:           "a lighthouse",
		Prompt_2:         "oil painting",
		NegativePrompt:   "blurry",
		NegativePrompt_2: "low contrast",
		Width:            64,
		Height:           64,
		Steps:            4,
		Seed:             proto.Uint64(2024),
		Conditioning: &sdservev1.MicroConditioning{
			OriginalSize:       &sdservev1.ImageSize{Width: 128, Height: 96},
			CropsCoordsTopLeft: &sdservev1.CropOffset{Top: 8, Left: 16},
			TargetSize:         &sdservev1.ImageSize{Width: 64, Height: 64},
			AestheticScore:     proto.Float32(7),
		},
		Refiner: &sdservev1.RefinerOptions{
			Model:    c.Refiner,
			Mode:     sdservev1.RefinerMode_REFINER_MODE_LATENT_HANDOFF,
			SwitchAt: proto.Float32(0.5),
		},
	}}
}

var passNames = map[sdservev1.DenoisePass]string{
	sdservev1.DenoisePass_DENOISE_PASS_BASE:    "base",
	sdservev1.DenoisePass_DENOISE_PASS_REFINER: "refiner",
}

func TestLiveSDXLRefiner(t *testing.T) {
	c := live(t)
	sc := loadSDXL(t)
	req := sdxlRequest(sc)
	ref := &sdservev1.GenerateRequest{}
	if err := protojson.Unmarshal(sc.Request, ref); err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(req, ref) {
		t.Fatalf("request differs from the reference:\n%v\n%v", req, ref)
	}
	var passes []string
	res, err := c.Generate(context.Background(), req, sdserve.OnEvent(func(e sdserve.Event) {
		if e.Progress != nil {
			name, ok := passNames[e.Progress.GetDenoisePass()]
			if !ok {
				name = e.Progress.GetDenoisePass().String()
			}
			passes = append(passes, name)
		}
	}))
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Images) != len(sc.Images) {
		t.Fatalf("%d images, want %d", len(res.Images), len(sc.Images))
	}
	for i, img := range res.Images {
		sum := sha256.Sum256(img.GetData())
		if got := hex.EncodeToString(sum[:]); got != sc.Images[i].SHA256 {
			t.Errorf("image %d: sha256 %s, want %s", i, got, sc.Images[i].SHA256)
		}
	}
	if !reflect.DeepEqual(passes, sc.Passes) {
		t.Errorf("passes %v, want %v", passes, sc.Passes)
	}
	s := res.Started
	if s.GetModel() != sc.Base || s.GetRefinerModel() != sc.Refiner {
		t.Errorf("started on %q + refiner %q", s.GetModel(), s.GetRefinerModel())
	}
	if s.GetRefinerModelRevision() == "" || s.GetRefinerModelVariant() == "" || s.GetMemoryStrategy() == "" {
		t.Errorf("started event lacks the refiner identity or memory strategy: %v", s)
	}
	p := res.Parameters
	if p.GetPrompt_2() != "oil painting" || p.GetNegativePrompt_2() != "low contrast" {
		t.Errorf("prompt_2 %q, negative_prompt_2 %q", p.GetPrompt_2(), p.GetNegativePrompt_2())
	}
	r := p.GetRefiner()
	if r.GetModel() != sc.Refiner || r.GetMode() != sdservev1.RefinerMode_REFINER_MODE_LATENT_HANDOFF || r.GetSwitchAt() != 0.5 {
		t.Errorf("resolved refiner %v", r)
	}
	if p.GetRefinerModelRevision() != s.GetRefinerModelRevision() || p.GetRefinerModelVariant() != s.GetRefinerModelVariant() {
		t.Errorf("refiner revision/variant %q/%q, started %q/%q", p.GetRefinerModelRevision(), p.GetRefinerModelVariant(),
			s.GetRefinerModelRevision(), s.GetRefinerModelVariant())
	}
	if p.GetMemoryStrategy() != s.GetMemoryStrategy() {
		t.Errorf("memory strategy %q, started %q", p.GetMemoryStrategy(), s.GetMemoryStrategy())
	}
	cond := p.GetConditioning()
	if o := cond.GetOriginalSize(); o.GetWidth() != 128 || o.GetHeight() != 96 {
		t.Errorf("original size %v", o)
	}
	if cr := cond.GetCropsCoordsTopLeft(); cr.GetTop() != 8 || cr.GetLeft() != 16 {
		t.Errorf("crop %v", cr)
	}
	if cond.GetAestheticScore() != 7 {
		t.Errorf("aesthetic score %v", cond.GetAestheticScore())
	}
}

func TestLiveSDXLModels(t *testing.T) {
	c := live(t)
	sc := loadSDXL(t)
	models, err := c.ListModels(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	byName := map[string]*sdservev1.ModelInfo{}
	for _, m := range models.GetModels() {
		byName[m.GetName()] = m
	}
	if m := byName[sc.Base]; m.GetFamily() != "sdxl" || m.GetRefiner() {
		t.Errorf("base model %v", m)
	}
	if m := byName[sc.Refiner]; m.GetFamily() != "sdxl" || !m.GetRefiner() {
		t.Errorf("refiner model %v", m)
	}
	others := 0
	for name, m := range byName {
		if name != sc.Base && name != sc.Refiner {
			others++
			if m.GetFamily() != "sd15" {
				t.Errorf("model %s: family %q, want sd15", name, m.GetFamily())
			}
		}
	}
	if others == 0 {
		t.Error("no SD 1.x model listed")
	}
}

func TestLiveSDXLMemoryPolicy(t *testing.T) {
	c := live(t)
	loadSDXL(t)
	info, err := c.GetServerInfo(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	m := info.GetMemory()
	if m == nil {
		t.Fatal("no memory policy")
	}
	for _, mode := range []string{m.GetVaeTiling(), m.GetVaeSlicing(), m.GetAttentionSlicing(), m.GetCpuOffload()} {
		if mode != "auto" && mode != "on" && mode != "off" {
			t.Errorf("memory mode %q in %v", mode, m)
		}
	}
}
