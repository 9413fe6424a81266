package sdserve

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/golang/protobuf/ptypes/duration"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestFromGRPCDecodesDetails(t *testing.T) {
	st, err := status.New(codes.InvalidArgument, "invalid request").WithDetails(
		&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{
			{Field: "params.width", Description: "must be a multiple of 8; got 13"},
		}},
		&errdetails.RetryInfo{RetryDelay: &duration.Duration{Seconds: 1, Nanos: 500_000_000}},
	)
	if err != nil {
		t.Fatal(err)
	}
	wrapped := fmt.Errorf("call: %w", fromGRPC(st.Err()))
	e, ok := AsError(wrapped)
	if !ok {
		t.Fatalf("AsError(%v) failed", wrapped)
	}
	if e.Code != codes.InvalidArgument || e.Message != "invalid request" {
		t.Errorf("got %v %q", e.Code, e.Message)
	}
	v, ok := e.Violation("params.width")
	if !ok || v.Description != "must be a multiple of 8; got 13" {
		t.Errorf("violation: %+v %v", v, ok)
	}
	if !e.HasRetryDelay || e.RetryDelay != 1500*time.Millisecond {
		t.Errorf("retry delay: %v %v", e.RetryDelay, e.HasRetryDelay)
	}
	if status.Code(e) != codes.InvalidArgument {
		t.Errorf("status.Code: %v", status.Code(e))
	}
}

func TestFromGRPCPassesThrough(t *testing.T) {
	if fromGRPC(nil) != nil {
		t.Error("nil error became non-nil")
	}
	plain := errors.New("not a status")
	if got := fromGRPC(plain); got != plain {
		t.Errorf("got %v", got)
	}
}
