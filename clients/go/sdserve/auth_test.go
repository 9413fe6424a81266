package sdserve

import (
	"context"
	"testing"
)

func TestWithAPIKeyMetadata(t *testing.T) {
	md, err := apiKey("s3cret").GetRequestMetadata(context.Background())
	if err != nil || md["authorization"] != "Bearer s3cret" {
		t.Errorf("metadata %v, %v", md, err)
	}
	if WithAPIKey("k") == nil {
		t.Error("nil dial option")
	}
}
