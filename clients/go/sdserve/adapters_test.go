package sdserve_test

import (
	"context"
	"math"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"

	sdservev1 "github.com/sdserve/sdserve/clients/go/gen/sdserve/v1"
	"github.com/sdserve/sdserve/clients/go/sdserve"
)

func ref(name string) *sdservev1.AdapterRef { return &sdservev1.AdapterRef{Name: name} }

func TestCheckAdaptersAcceptsTheContractsRange(t *testing.T) {
	ok := []*sdservev1.AdapterRef{ref("plain"), sdserve.Adapter("max", 4), sdserve.Adapter("min", -4), sdserve.Adapter("off", 0)}
	if err := sdserve.CheckAdapters(ok); err != nil {
		t.Fatal(err)
	}
	if err := sdserve.CheckAdapters(nil); err != nil {
		t.Fatal(err)
	}
	if a := sdserve.Adapter("x", 0.5); a.GetName() != "x" || a.Scale == nil || a.GetScale() != 0.5 {
		t.Errorf("Adapter: %v", a)
	}
}

func TestCheckAdaptersNamesEachBadField(t *testing.T) {
	cases := []struct {
		adapters []*sdservev1.AdapterRef
		field    string
		words    string
	}{
		{[]*sdservev1.AdapterRef{ref("")}, "params.adapters[0].name", "must not be empty"},
		{[]*sdservev1.AdapterRef{ref("a"), ref(" ")}, "params.adapters[1].name", "must not be empty"},
		{[]*sdservev1.AdapterRef{ref("a"), sdserve.Adapter("b", 1), sdserve.Adapter("a", 2)}, "params.adapters[2].name", `"a" is already params.adapters[0]`},
		{[]*sdservev1.AdapterRef{sdserve.Adapter("a", 4.01)}, "params.adapters[0].scale", "from -4 to 4"},
		{[]*sdservev1.AdapterRef{ref("a"), sdserve.Adapter("b", -5)}, "params.adapters[1].scale", "from -4 to 4"},
		{[]*sdservev1.AdapterRef{sdserve.Adapter("a", float32(math.NaN()))}, "params.adapters[0].scale", "finite"},
		{[]*sdservev1.AdapterRef{sdserve.Adapter("a", float32(math.Inf(-1)))}, "params.adapters[0].scale", "finite"},
	}
	for _, tc := range cases {
		err := sdserve.CheckAdapters(tc.adapters)
		e, ok := sdserve.AsError(err)
		if !ok || e.Code != codes.InvalidArgument {
			t.Errorf("%v: got %v, want InvalidArgument", tc.adapters, err)
			continue
		}
		v, found := e.Violation(tc.field)
		if !found || !strings.Contains(v.Description, tc.words) {
			t.Errorf("%v: violations %v, want %s: ...%s...", tc.adapters, e.FieldViolations, tc.field, tc.words)
		}
		if !strings.HasPrefix(e.Message, tc.field+": ") {
			t.Errorf("message %q does not start with the field", e.Message)
		}
	}
}

func TestBadAdaptersAreRefusedBeforeTheCall(t *testing.T) {
	// Nothing listens on port 1: a call that went out would fail with Unavailable, not InvalidArgument.
	c, err := sdserve.Dial(context.Background(), "127.0.0.1:1")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	params := &sdservev1.GenerationParams{Prompt: "x", Adapters: []*sdservev1.AdapterRef{sdserve.Adapter("a", 9)}}
	ctx := context.Background()
	_, genErr := c.Generate(ctx, &sdservev1.GenerateRequest{Params: params})
	_, editErr := c.Edit(ctx, &sdservev1.EditRequest{Params: params})
	_, inpaintErr := c.Inpaint(ctx, &sdservev1.InpaintRequest{Params: params})
	for _, err := range []error{genErr, editErr, inpaintErr} {
		if e, ok := sdserve.AsError(err); !ok || e.Code != codes.InvalidArgument {
			t.Errorf("got %v, want InvalidArgument", err)
		} else if _, found := e.Violation("params.adapters[0].scale"); !found {
			t.Errorf("violations %v", e.FieldViolations)
		}
	}
}
