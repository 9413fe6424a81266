/** The inpainting mask: painted with the pointer over the input image; white (255) means "repaint". */

/** Share of a mask's pixels that count as white (128 and above, as the server reads them). */
export function whiteShare(data: ImageData): number {
  let white = 0;
  for (let i = 0; i < data.data.length; i += 4) {
    if ((data.data[i] ?? 0) >= 128) {
      white += 1;
    }
  }
  return data.width * data.height === 0 ? 0 : white / (data.width * data.height);
}

/**
 * Paints a black-and-white mask at the input image's own resolution. The mask itself lives on an offscreen
 * canvas (what is sent); `overlay`, laid over the image on the page, shows the painted part in colour.
 */
export class MaskPainter {
  /** Brush diameter in pixels of the image. */
  brush = 8;
  private readonly mask = document.createElement("canvas");
  private readonly maskCtx: CanvasRenderingContext2D;
  private readonly overlayCtx: CanvasRenderingContext2D;
  private last: { x: number; y: number } | null = null;

  constructor(
    private readonly overlay: HTMLCanvasElement,
    private readonly colour: string,
    private readonly onChange: (share: number) => void,
  ) {
    this.maskCtx = context(this.mask);
    this.overlayCtx = context(overlay);
    overlay.addEventListener("pointerdown", (e) => this.down(e));
    overlay.addEventListener("pointermove", (e) => this.move(e));
    overlay.addEventListener("pointerup", () => this.up());
    overlay.addEventListener("pointercancel", () => this.up());
  }

  get width(): number {
    return this.mask.width;
  }

  get height(): number {
    return this.mask.height;
  }

  /** A black (keep everything) mask of this size. */
  reset(width: number, height: number): void {
    this.mask.width = this.overlay.width = width;
    this.mask.height = this.overlay.height = height;
    this.clear();
  }

  /** Back to all black. */
  clear(): void {
    this.maskCtx.fillStyle = "#000";
    this.maskCtx.fillRect(0, 0, this.width, this.height);
    this.overlayCtx.clearRect(0, 0, this.width, this.height);
    this.changed();
  }

  /** Swaps what is repainted and what is kept. */
  invert(): void {
    const data = this.maskCtx.getImageData(0, 0, this.width, this.height);
    for (let i = 0; i < data.data.length; i += 4) {
      const v = 255 - (data.data[i] ?? 0);
      data.data[i] = data.data[i + 1] = data.data[i + 2] = v;
      data.data[i + 3] = 255;
    }
    this.maskCtx.putImageData(data, 0, 0);
    this.redrawOverlay(data);
    this.changed();
  }

  /** Share of the image to be repainted, 0 to 1. */
  share(): number {
    return whiteShare(this.maskCtx.getImageData(0, 0, this.width, this.height));
  }

  /** The mask as PNG bytes, the size of the input image. */
  async png(): Promise<Uint8Array> {
    const blob = await new Promise<Blob | null>((resolve) => this.mask.toBlob(resolve, "image/png"));
    if (blob === null) {
      throw new Error("the browser could not encode the mask as PNG");
    }
    return new Uint8Array(await blob.arrayBuffer());
  }

  /** The mask as a data: URL (for the "mask sent" thumbnail). */
  dataUrl(): string {
    return this.mask.toDataURL("image/png");
  }

  private point(e: PointerEvent): { x: number; y: number } {
    const rect = this.overlay.getBoundingClientRect();
    return {
      x: ((e.clientX - rect.left) * this.width) / rect.width,
      y: ((e.clientY - rect.top) * this.height) / rect.height,
    };
  }

  private down(e: PointerEvent): void {
    if (e.button !== 0 || this.width === 0) {
      return;
    }
    e.preventDefault();
    this.overlay.setPointerCapture(e.pointerId);
    this.last = this.point(e);
    this.stroke(this.last, this.last);
  }

  private move(e: PointerEvent): void {
    if (this.last === null) {
      return;
    }
    const p = this.point(e);
    this.stroke(this.last, p);
    this.last = p;
  }

  private up(): void {
    if (this.last !== null) {
      this.last = null;
      this.changed();
    }
  }

  private stroke(from: { x: number; y: number }, to: { x: number; y: number }): void {
    for (const [ctx, colour] of [
      [this.maskCtx, "#fff"],
      [this.overlayCtx, this.colour],
    ] as const) {
      ctx.strokeStyle = colour;
      ctx.lineWidth = this.brush;
      ctx.lineCap = "round";
      ctx.lineJoin = "round";
      ctx.beginPath();
      ctx.moveTo(from.x, from.y);
      ctx.lineTo(to.x, to.y);
      ctx.stroke();
    }
  }

  /** The overlay from the mask: the colour where the mask is white, transparent elsewhere. */
  private redrawOverlay(mask: ImageData): void {
    const rgb = parseColour(this.colour);
    const out = this.overlayCtx.createImageData(mask.width, mask.height);
    for (let i = 0; i < mask.data.length; i += 4) {
      const on = (mask.data[i] ?? 0) >= 128;
      out.data[i] = rgb[0];
      out.data[i + 1] = rgb[1];
      out.data[i + 2] = rgb[2];
      out.data[i + 3] = on ? 255 : 0;
    }
    this.overlayCtx.putImageData(out, 0, 0);
  }

  private changed(): void {
    this.onChange(this.share());
  }
}

function context(canvas: HTMLCanvasElement): CanvasRenderingContext2D {
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  if (ctx === null) {
    throw new Error("this browser has no 2D canvas");
  }
  return ctx;
}

/** `#rrggbb` as [r, g, b]. */
function parseColour(hex: string): [number, number, number] {
  const n = Number.parseInt(hex.replace("#", ""), 16);
  return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
}
