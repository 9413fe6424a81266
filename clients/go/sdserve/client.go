package sdserve

import (
	"context"
	"errors"
	"io"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	sdservev1 "github.com/sdserve/sdserve/clients/go/gen/sdserve/v1"
)

// DefaultMaxMessageBytes is the receive and send limit Dial sets: result images exceed gRPC's
// 4 MiB default, and the server's own default limit is 64 MiB.
const DefaultMaxMessageBytes = 64 << 20

// Client calls one sdserve server. It is safe for concurrent use.
type Client struct {
	conn *grpc.ClientConn
	raw  sdservev1.DiffusionServiceClient
	own  bool
}

// Dial connects to addr ("host:port") without TLS, with 64 MiB message limits. Further options
// (for example grpc.WithTransportCredentials) are applied after these and can override them.
// The connection is made lazily; calls wait for it.
func Dial(ctx context.Context, addr string, opts ...grpc.DialOption) (*Client, error) {
	base := []grpc.DialOption{
		grpc.WithInsecure(),
		grpc.WithDefaultCallOptions(
			grpc.MaxCallRecvMsgSize(DefaultMaxMessageBytes),
			grpc.MaxCallSendMsgSize(DefaultMaxMessageBytes),
		),
	}
	conn, err := grpc.DialContext(ctx, addr, append(base, opts...)...)
	if err != nil {
		return nil, err
	}
	c := NewClient(conn)
	c.own = true
	return c, nil
}

// NewClient wraps an existing connection; Close leaves it open. The connection should set
// grpc.MaxCallRecvMsgSize (see DefaultMaxMessageBytes) for results larger than 4 MiB.
func NewClient(conn *grpc.ClientConn) *Client {
	return &Client{conn: conn, raw: sdservev1.NewDiffusionServiceClient(conn)}
}

// Close closes the connection if Dial made it.
func (c *Client) Close() error {
	if c.own {
		return c.conn.Close()
	}
	return nil
}

// Raw returns the generated client, for anything this wrapper does not cover.
func (c *Client) Raw() sdservev1.DiffusionServiceClient { return c.raw }

// Event is one event of a Generate, Edit or Inpaint stream; exactly one field is set. In stream
// order: Queued, Started, zero or more Progress (Step 1..TotalSteps, with previews when asked
// for), then Result.
type Event struct {
	Queued   *sdservev1.QueuedEvent
	Started  *sdservev1.StartedEvent
	Progress *sdservev1.ProgressEvent
	Result   *sdservev1.ResultEvent
}

// Result is what Generate, Edit and Inpaint return.
type Result struct {
	// Images are the result images in index order.
	Images []*sdservev1.Image
	// Parameters are the values the request actually ran with.
	Parameters *sdservev1.ResolvedParameters
	// Timings say where the time went, in seconds.
	Timings *sdservev1.Timings
	// RequestID is the caller's request id or the one the server made.
	RequestID string
	// Started is the started event (seeds, model, revision, refiner, memory strategy, adapters),
	// when the server sent one.
	Started *sdservev1.StartedEvent
	// Adapters are the adapters the request ran with (Parameters.Adapters): LoRAs with their
	// scales and embeddings the prompts used, sorted by name, each with its weights' SHA-256.
	Adapters []*sdservev1.ResolvedAdapter
	// ExecutionProfile is the execution profile it ran in (Parameters.ExecutionProfile): "exact",
	// or levers joined by "+" such as "bf16-autocast+channels-last". Set Params.Precision to
	// PRECISION_EXACT for the exact pipeline.
	ExecutionProfile string
	// Replica is the replica (server process) that served the request (Parameters.Replica): the
	// server's replica setting, by default its host name (the pod name in Kubernetes); "" from
	// servers before fleets. See docs/fleet.md.
	Replica string
}

// CallOption configures one call.
type CallOption func(*callConfig)

type callConfig struct {
	onEvent func(Event)
	grpc    []grpc.CallOption
}

// OnEvent calls fn for every stream event, in order, before Generate/Edit/Inpaint return.
func OnEvent(fn func(Event)) CallOption { return func(c *callConfig) { c.onEvent = fn } }

// WithGRPCOptions passes options (per-call credentials, headers, ...) to the gRPC call.
func WithGRPCOptions(opts ...grpc.CallOption) CallOption {
	return func(c *callConfig) { c.grpc = append(c.grpc, opts...) }
}

func configure(opts []CallOption) callConfig {
	var cfg callConfig
	for _, o := range opts {
		o(&cfg)
	}
	return cfg
}

// Stream reads the events of one Generate, Edit or Inpaint call. Cancel its context to cancel
// the call (the server stops within one denoising step). Read until Recv returns an error
// (io.EOF at a clean end) or cancel the context; otherwise the call's resources are kept.
type Stream struct {
	recv func() (Event, error)
}

// Recv returns the next event; io.EOF after the result event and a clean end, an *Error otherwise.
func (s *Stream) Recv() (Event, error) { return s.recv() }

// event messages share one shape across the three response types.
type eventResponse interface {
	GetQueued() *sdservev1.QueuedEvent
	GetStarted() *sdservev1.StartedEvent
	GetProgress() *sdservev1.ProgressEvent
	GetResult() *sdservev1.ResultEvent
}

func newStream[R eventResponse](recv func() (R, error)) *Stream {
	return &Stream{recv: func() (Event, error) {
		for {
			r, err := recv()
			if err == io.EOF {
				return Event{}, io.EOF
			}
			if err != nil {
				return Event{}, fromGRPC(err)
			}
			e := Event{Queued: r.GetQueued(), Started: r.GetStarted(), Progress: r.GetProgress(), Result: r.GetResult()}
			if e != (Event{}) {
				return e, nil
			}
			// An unset oneof is an event kind newer than this client: skip it.
		}
	}}
}

// GenerateStream starts text-to-image and returns its events. Params.Adapters are checked first
// (CheckAdapters): a bad one is an *Error with code InvalidArgument and no call is made.
func (c *Client) GenerateStream(ctx context.Context, req *sdservev1.GenerateRequest, opts ...CallOption) (*Stream, error) {
	if err := CheckAdapters(req.GetParams().GetAdapters()); err != nil {
		return nil, err
	}
	s, err := c.raw.Generate(ctx, req, configure(opts).grpc...)
	if err != nil {
		return nil, fromGRPC(err)
	}
	return newStream(s.Recv), nil
}

// EditStream starts image-to-image and returns its events.
func (c *Client) EditStream(ctx context.Context, req *sdservev1.EditRequest, opts ...CallOption) (*Stream, error) {
	if err := CheckAdapters(req.GetParams().GetAdapters()); err != nil {
		return nil, err
	}
	s, err := c.raw.Edit(ctx, req, configure(opts).grpc...)
	if err != nil {
		return nil, fromGRPC(err)
	}
	return newStream(s.Recv), nil
}

// InpaintStream starts inpainting and returns its events.
func (c *Client) InpaintStream(ctx context.Context, req *sdservev1.InpaintRequest, opts ...CallOption) (*Stream, error) {
	if err := CheckAdapters(req.GetParams().GetAdapters()); err != nil {
		return nil, err
	}
	s, err := c.raw.Inpaint(ctx, req, configure(opts).grpc...)
	if err != nil {
		return nil, fromGRPC(err)
	}
	return newStream(s.Recv), nil
}

// Generate runs text-to-image and returns the images and their metadata.
func (c *Client) Generate(ctx context.Context, req *sdservev1.GenerateRequest, opts ...CallOption) (*Result, error) {
	// The stream's resources are released on every path, even if onEvent panics.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s, err := c.GenerateStream(ctx, req, opts...)
	if err != nil {
		return nil, err
	}
	return collect(s, configure(opts).onEvent)
}

// Edit runs image-to-image and returns the images and their metadata.
func (c *Client) Edit(ctx context.Context, req *sdservev1.EditRequest, opts ...CallOption) (*Result, error) {
	// The stream's resources are released on every path, even if onEvent panics.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s, err := c.EditStream(ctx, req, opts...)
	if err != nil {
		return nil, err
	}
	return collect(s, configure(opts).onEvent)
}

// Inpaint runs inpainting and returns the images and their metadata.
func (c *Client) Inpaint(ctx context.Context, req *sdservev1.InpaintRequest, opts ...CallOption) (*Result, error) {
	// The stream's resources are released on every path, even if onEvent panics.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s, err := c.InpaintStream(ctx, req, opts...)
	if err != nil {
		return nil, err
	}
	return collect(s, configure(opts).onEvent)
}

func collect(s *Stream, onEvent func(Event)) (*Result, error) {
	var started *sdservev1.StartedEvent
	var result *Result
	// Read to the end, not just to the result event: the call finishes (and its status is
	// checked) only when Recv returns io.EOF.
	for {
		e, err := s.Recv()
		if errors.Is(err, io.EOF) {
			if result == nil {
				return nil, fromStatus(status.New(codes.Internal, "the stream ended with OK but without a result event"), nil)
			}
			return result, nil
		}
		if err != nil {
			return nil, err
		}
		if onEvent != nil {
			onEvent(e)
		}
		if e.Started != nil {
			started = e.Started
		}
		if r := e.Result; r != nil {
			result = &Result{
				Images:     r.GetImages(),
				Parameters: r.GetParameters(),
				Timings:    r.GetTimings(),
				RequestID:  r.GetRequestId(),
				Started:    started,
				Adapters:   r.GetParameters().GetAdapters(),
				// The profile the request ran in, as the result's parameters report it.
				ExecutionProfile: r.GetParameters().GetExecutionProfile(),
				Replica:          r.GetParameters().GetReplica(),
			}
		}
	}
}

// ListModels lists the models the server can serve.
func (c *Client) ListModels(ctx context.Context, opts ...CallOption) (*sdservev1.ListModelsResponse, error) {
	r, err := c.raw.ListModels(ctx, &sdservev1.ListModelsRequest{}, configure(opts).grpc...)
	return r, fromGRPC(err)
}

// GetServerInfo describes the server's device, versions, schedulers and limits.
func (c *Client) GetServerInfo(ctx context.Context, opts ...CallOption) (*sdservev1.GetServerInfoResponse, error) {
	r, err := c.raw.GetServerInfo(ctx, &sdservev1.GetServerInfoRequest{}, configure(opts).grpc...)
	return r, fromGRPC(err)
}
