// Package sdserve is a thin, typed client for the sdserve Stable Diffusion gRPC service.
//
// It wraps the generated DiffusionService client (package sdservev1) with:
//
//   - Generate, Edit and Inpaint calls that return the final images and their metadata,
//     with an optional typed callback for every stream event (progress and previews);
//   - GenerateStream, EditStream and InpaintStream for reading the events one by one;
//   - cancellation and deadlines through context.Context;
//   - 64 MiB message limits, since result images exceed gRPC's 4 MiB default;
//   - errors as *Error, with the gRPC code, the google.rpc.BadRequest field violations and the
//     google.rpc.RetryInfo delay decoded.
//
// Example:
//
//	c, err := sdserve.Dial(ctx, "127.0.0.1:50051")
//	if err != nil { ... }
//	defer c.Close()
//	res, err := c.Generate(ctx, &sdservev1.GenerateRequest{Params: &sdservev1.GenerationParams{
//		Prompt: "a red circle", Steps: 20, Seed: proto.Uint64(42),
//	}}, sdserve.OnEvent(func(e sdserve.Event) {
//		if e.Progress != nil { log.Printf("step %d/%d", e.Progress.Step, e.Progress.TotalSteps) }
//	}))
//
// Requests are the generated messages, so SDXL's fields are set like any other: Prompt_2,
// NegativePrompt_2, Conditioning (micro-conditioning) and Refiner (a second pass, whose progress
// events carry DenoisePass REFINER).
//
// Adapters too: Params.Adapters lists LoRAs for one request (sdserve.Adapter(name, scale), scale -4
// to 4; a nil Scale means 1), checked by CheckAdapters before the call. StartedEvent.Adapters and
// Result.Adapters report the ResolvedAdapter list (name, kind, scale, SHA-256, token) that ran;
// GetServerInfo lists the server's adapters (AdapterInfo) and Limits.MaxAdapters.
package sdserve
