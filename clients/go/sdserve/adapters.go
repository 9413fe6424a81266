package sdserve

import (
	"fmt"
	"math"
	"strings"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	sdservev1 "github.com/sdserve/sdserve/clients/go/gen/sdserve/v1"
)

// MaxAdapterScale bounds an adapter's scale: -MaxAdapterScale to MaxAdapterScale.
const MaxAdapterScale = 4

// Adapter returns a LoRA reference for GenerationParams.Adapters at scale (-4 to 4). A reference
// with a nil Scale, &sdservev1.AdapterRef{Name: name}, runs at the server's default scale, 1.
func Adapter(name string, scale float32) *sdservev1.AdapterRef {
	return &sdservev1.AdapterRef{Name: name, Scale: &scale}
}

// CheckAdapters checks a request's adapters as the contract states them: a non-empty name, each
// name once, a finite scale from -4 to 4 when set. It returns nil or an *Error with code
// InvalidArgument and one field violation per bad field ("params.adapters[1].name", ...).
// GenerateStream, EditStream and InpaintStream (and so Generate, Edit and Inpaint) call it before
// sending; the server's own limit (GetServerInfo's Limits.MaxAdapters) and the names it knows are
// checked there.
func CheckAdapters(adapters []*sdservev1.AdapterRef) error {
	var violations []*errdetails.BadRequest_FieldViolation
	bad := func(i int, field, rule string) {
		violations = append(violations, &errdetails.BadRequest_FieldViolation{
			Field: fmt.Sprintf("params.adapters[%d].%s", i, field), Description: rule,
		})
	}
	seen := map[string]int{}
	for i, a := range adapters {
		name := a.GetName()
		if strings.TrimSpace(name) == "" {
			bad(i, "name", "must not be empty")
		} else if first, dup := seen[name]; dup {
			bad(i, "name", fmt.Sprintf("%q is already params.adapters[%d] (each adapter once)", name, first))
		} else {
			seen[name] = i
		}
		if a.Scale != nil {
			s := float64(a.GetScale())
			if math.IsNaN(s) || math.IsInf(s, 0) || s < -MaxAdapterScale || s > MaxAdapterScale {
				bad(i, "scale", fmt.Sprintf("must be a finite number from -%d to %d, got %g", MaxAdapterScale, MaxAdapterScale, s))
			}
		}
	}
	if len(violations) == 0 {
		return nil
	}
	msg := violations[0].Field + ": " + violations[0].Description
	st := status.New(codes.InvalidArgument, msg)
	if detailed, err := st.WithDetails(&errdetails.BadRequest{FieldViolations: violations}); err == nil {
		st = detailed
	}
	return fromStatus(st, nil)
}
