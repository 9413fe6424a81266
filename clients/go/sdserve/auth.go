package sdserve

import (
	"context"

	"google.golang.org/grpc"
)

// WithAPIKey sends "authorization: Bearer <key>" on every call, for servers started with API
// keys. It does not require TLS, so that it works on localhost and inside a service mesh; add
// grpc.WithTransportCredentials for anything else.
func WithAPIKey(key string) grpc.DialOption {
	return grpc.WithPerRPCCredentials(apiKey(key))
}

type apiKey string

func (k apiKey) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(k)}, nil
}

func (apiKey) RequireTransportSecurity() bool { return false }
