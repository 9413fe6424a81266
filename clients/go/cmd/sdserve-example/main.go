// Command sdserve-example generates one image, writing each preview as it arrives and the result
// at the end. Ctrl-C cancels the request (the server stops within one step). With an SDXL model,
// -prompt2 sets the second text encoder's prompt and -refiner adds a refiner pass.
//
//	go run ./cmd/sdserve-example -addr 127.0.0.1:50051 -prompt "a red circle" -out out
//	go run ./cmd/sdserve-example -model sdxl-base -refiner sdxl-refiner -refiner-switch 0.8 -prompt "a lighthouse"
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"path/filepath"
	"time"

	"google.golang.org/protobuf/proto"

	sdservev1 "github.com/sdserve/sdserve/clients/go/gen/sdserve/v1"
	"github.com/sdserve/sdserve/clients/go/sdserve"
)

var extensions = map[sdservev1.ImageFormat]string{
	sdservev1.ImageFormat_IMAGE_FORMAT_PNG:  "png",
	sdservev1.ImageFormat_IMAGE_FORMAT_JPEG: "jpg",
	sdservev1.ImageFormat_IMAGE_FORMAT_WEBP: "webp",
}

func main() {
	addr := flag.String("addr", "127.0.0.1:50051", "server address, host:port")
	prompt := flag.String("prompt", "a red circle on a white background", "the prompt")
	steps := flag.Uint("steps", 20, "denoising steps")
	seed := flag.Int64("seed", -1, "seed; negative lets the server pick one")
	width := flag.Uint("width", 0, "width in pixels; 0 is the model's default")
	height := flag.Uint("height", 0, "height in pixels; 0 is the model's default")
	out := flag.String("out", "out", "output folder")
	timeout := flag.Duration("timeout", 10*time.Minute, "deadline for the whole request")
	model := flag.String("model", "", "model name or alias; empty is the server's default")
	prompt2 := flag.String("prompt2", "", "SDXL only: the second text encoder's prompt; empty is -prompt")
	refiner := flag.String("refiner", "", "SDXL only: refiner model for a second pass; empty is none")
	switchAt := flag.Float64("refiner-switch", 0, "with -refiner: fraction of the schedule the base model runs, (0, 1); 0 is the server's default (0.8)")
	flag.Parse()
	params := &sdservev1.GenerationParams{
		Model: *model, Prompt: *prompt, Prompt_2: *prompt2, Steps: uint32(*steps), Width: uint32(*width), Height: uint32(*height),
		Preview: &sdservev1.PreviewOptions{Mode: sdservev1.PreviewMode_PREVIEW_MODE_LATENT_RGB, EveryNSteps: 1},
	}
	if *seed >= 0 {
		params.Seed = proto.Uint64(uint64(*seed))
	}
	if *refiner != "" {
		params.Refiner = &sdservev1.RefinerOptions{Model: *refiner}
		if *switchAt > 0 {
			params.Refiner.SwitchAt = proto.Float32(float32(*switchAt))
		}
	}
	if err := run(*addr, params, *out, *timeout); err != nil {
		if e, ok := sdserve.AsError(err); ok {
			fmt.Fprintf(os.Stderr, "sdserve: %s: %s\n", e.Code, e.Message)
			for _, v := range e.FieldViolations {
				fmt.Fprintf(os.Stderr, "  %s: %s\n", v.Field, v.Description)
			}
			if e.HasRetryDelay {
				fmt.Fprintf(os.Stderr, "  retry after %s\n", e.RetryDelay)
			}
			os.Exit(1)
		}
		log.Fatal(err)
	}
}

func run(addr string, params *sdservev1.GenerationParams, out string, timeout time.Duration) error {
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	c, err := sdserve.Dial(ctx, addr)
	if err != nil {
		return err
	}
	defer c.Close()

	var writeErr error
	res, err := c.Generate(ctx, &sdservev1.GenerateRequest{Params: params}, sdserve.OnEvent(func(e sdserve.Event) {
		switch {
		case e.Queued != nil:
			fmt.Printf("queued at position %d\n", e.Queued.GetPosition())
		case e.Started != nil:
			fmt.Printf("started on %s with seeds %v\n", e.Started.GetModel(), e.Started.GetSeeds())
			if r := e.Started.GetRefinerModel(); r != "" {
				fmt.Printf("refiner %s@%s\n", r, e.Started.GetRefinerModelRevision())
			}
		case e.Progress != nil:
			for _, p := range e.Progress.GetPreviews() {
				name := fmt.Sprintf("preview-%d-%sstep-%d.%s", p.GetIndex(), passPrefix(e.Progress), e.Progress.GetStep(), extensions[p.GetFormat()])
				if err := os.WriteFile(filepath.Join(out, name), p.GetData(), 0o644); err != nil && writeErr == nil {
					writeErr = err
				}
			}
			fmt.Printf("%sstep %d/%d\n", passPrefix(e.Progress), e.Progress.GetStep(), e.Progress.GetTotalSteps())
		}
	}))
	if err != nil {
		return err
	}
	if writeErr != nil {
		return writeErr
	}
	for _, img := range res.Images {
		name := filepath.Join(out, fmt.Sprintf("image-%d-seed-%d.%s", img.GetIndex(), img.GetSeed(), extensions[img.GetFormat()]))
		if err := os.WriteFile(name, img.GetData(), 0o644); err != nil {
			return err
		}
		fmt.Printf("wrote %s (%dx%d)\n", name, img.GetWidth(), img.GetHeight())
	}
	return nil
}

// passPrefix names the denoising pass of a request with a refiner ("base-", "refiner-"); steps
// count within each pass. Empty for a request with one pass.
func passPrefix(p *sdservev1.ProgressEvent) string {
	switch p.GetDenoisePass() {
	case sdservev1.DenoisePass_DENOISE_PASS_REFINER:
		return "refiner-"
	case sdservev1.DenoisePass_DENOISE_PASS_BASE:
		return "base-"
	}
	return ""
}
