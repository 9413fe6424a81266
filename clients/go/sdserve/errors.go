package sdserve

import (
	"errors"
	"fmt"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// FieldViolation names one bad request field (a path such as "params.width") and the rule it broke.
type FieldViolation struct {
	Field       string
	Description string
}

// Error is the error every call returns when the server (or the client's context) ends it
// with a non-OK status. Use errors.As(err, &e) or AsError(err) to read it.
type Error struct {
	// Code is the gRPC status code, for example codes.InvalidArgument or codes.Canceled.
	Code codes.Code
	// Message is the server's status message.
	Message string
	// FieldViolations lists each bad field of an INVALID_ARGUMENT request.
	FieldViolations []FieldViolation
	// RetryDelay is the server's suggested wait before retrying (RESOURCE_EXHAUSTED when the
	// queue is full); HasRetryDelay says whether the server sent one.
	RetryDelay    time.Duration
	HasRetryDelay bool

	status *status.Status
	cause  error
}

func (e *Error) Error() string {
	return fmt.Sprintf("sdserve: %s: %s", e.Code, e.Message)
}

// GRPCStatus lets status.FromError and status.Code see through an *Error.
func (e *Error) GRPCStatus() *status.Status { return e.status }

// Unwrap returns the error the gRPC library returned.
func (e *Error) Unwrap() error { return e.cause }

// Violation returns the violation for field (for example "params.width"), if the server named it.
func (e *Error) Violation(field string) (FieldViolation, bool) {
	for _, v := range e.FieldViolations {
		if v.Field == field {
			return v, true
		}
	}
	return FieldViolation{}, false
}

// AsError returns err as an *Error, if it is (or wraps) one.
func AsError(err error) (*Error, bool) {
	var e *Error
	ok := errors.As(err, &e)
	return e, ok
}

// fromGRPC turns an error from the gRPC library into an *Error with its details decoded.
// Errors without a gRPC status (there should be none) are returned unchanged.
func fromGRPC(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := AsError(err); ok {
		return err
	}
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	return fromStatus(st, err)
}

func fromStatus(st *status.Status, cause error) *Error {
	e := &Error{Code: st.Code(), Message: st.Message(), status: st, cause: cause}
	for _, detail := range st.Details() {
		switch d := detail.(type) {
		case *errdetails.BadRequest:
			for _, v := range d.GetFieldViolations() {
				e.FieldViolations = append(e.FieldViolations, FieldViolation{Field: v.GetField(), Description: v.GetDescription()})
			}
		case *errdetails.RetryInfo:
			if d.GetRetryDelay() != nil {
				e.RetryDelay = d.GetRetryDelay().AsDuration()
				e.HasRetryDelay = true
			}
		}
	}
	return e
}
