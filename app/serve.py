"""`vqclip serve`: generate, edit and search in the browser, with gradio (`pip install -e '.[web]'`).

    vqclip serve                                    # the released shapes-world model and a small shapes index
    vqclip serve --model models/mine --index runs/index --host 0.0.0.0 --port 7860

One model is loaded, once. Requests wait in a bounded queue and the model serves one at a time; when the
queue is full a request is answered "busy, try again" at once. A request whose client leaves (closed tab,
cancelled call) stops at the model's next drawing step. Bad input (an empty prompt, numbers out of range,
an upload that is no picture or is too large) is answered with a message in the page. The server listens on
127.0.0.1 unless `--host` says otherwise and serves no file of the machine it runs on: only the pictures
it made and the uploads it was sent.
"""

from __future__ import annotations

import argparse
import html
import math
import os
import shlex
import tempfile
import threading
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from common.cli import add_device_arg, integer
from common.data import BadImage, load_image
from common.grid import make_grid
from pipelines.image_search import ImageSearchPipeline, hit_image
from pipelines.text_to_image import RERANKERS, TextToImagePipeline

MAX_PROMPTS = 8  # prompts (lines) in one request
MAX_PROMPT_TEXT = 10_000  # characters of the whole prompt box
MAX_IMAGES = 16  # pictures per prompt
MAX_CANDIDATES = 16  # samples drawn for each picture kept
MAX_SAMPLES = 256  # samples one request may draw: prompts x pictures x candidates
MAX_SEED = 2**31 - 1
MAX_RESULTS = 32  # search results
MAX_UPLOAD = "10mb"  # gradio refuses larger uploads before they reach a handler
MAX_UPLOAD_PIXELS = 4096 * 4096
QUEUE_SIZE = 8  # requests waiting for the model; one more is answered "busy"
POLL_SECONDS = 0.2  # how often a waiting request reports progress and notices that its client left
ABANDONED_SECONDS = 10.0  # a model call whose request stopped polling this long, without closing, is stopped
CELL = 128  # side of a picture in the downloadable grid; search results are at most twice that


class Cancelled(Exception):
    """The request that started a model call is gone."""


class ModelWorker:
    """Runs model calls one at a time in a background thread.

    A request iterates `run(...)` while the call runs, yielding `idle` every POLL_SECONDS and reporting
    progress. When the request is closed (gradio closes it when its client leaves or cancels), the call
    raises `Cancelled` at its next drawing step and frees the model. A request dropped without being closed
    (its task cancelled before gradio kept hold of it) stops polling: the call is stopped ABANDONED_SECONDS later.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()  # held while a call runs, a stopped one until its current step ends
        self.steps = 0  # drawing steps taken since the server started

    def run(self, call: Callable[[Callable[[int, int], None]], Any], progress: Any, idle: Any) -> Generator:
        stop = threading.Event()
        state = {"done": 0, "total": 0, "polled": time.monotonic()}
        outcome: dict[str, Any] = {}

        def on_step(done: int, total: int) -> None:
            if stop.is_set() or time.monotonic() - state["polled"] > ABANDONED_SECONDS:
                raise Cancelled
            self.steps += 1
            state["done"], state["total"] = done, total

        def target() -> None:
            with self.lock:
                try:
                    if stop.is_set():
                        raise Cancelled
                    outcome["value"] = call(on_step)
                except BaseException as err:  # handed to the request, which reports it
                    outcome["error"] = err

        thread = threading.Thread(target=target, name="vqclip-model", daemon=True)
        thread.start()
        try:
            while thread.is_alive():
                thread.join(POLL_SECONDS)
                if state["total"]:
                    progress((state["done"], state["total"]), desc="drawing codes", unit="steps")
                yield idle
                state["polled"] = time.monotonic()
        finally:
            stop.set()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]


def _error(message: str) -> Exception:
    """A message for the page (which renders it as HTML: what the user typed is escaped)."""
    import gradio as gr

    return gr.Error(html.escape(message, quote=False), print_exception=False)


def _whole(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _error(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    if value != int(value) or not low <= value <= high:
        raise _error(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return int(value)


def _real(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise _error(f"{name} must be a number from {low:g} to {high:g}, got {value!r}")
    return float(value)


def generation_settings(
    pipe: TextToImagePipeline,
    prompts: Any,
    num_images: Any,
    guidance_scale: Any,
    temperature: Any,
    top_k: Any,
    top_p: Any,
    num_candidates: Any,
    rerank: Any,
    seed: Any,
) -> dict[str, Any]:
    """The pipeline's arguments for one request of the Generate tab (all but the generator, plus `seed`);
    raises gr.Error naming the first bad field."""
    if not isinstance(prompts, str) or len(prompts) > MAX_PROMPT_TEXT:
        raise _error(f"the prompts must be text of at most {MAX_PROMPT_TEXT:,} characters")
    lines = [line for line in prompts.splitlines() if line.strip()]
    if not lines:
        raise _error('write a prompt first, e.g. "a blue ball on grass"')
    if len(lines) > MAX_PROMPTS:
        raise _error(f"at most {MAX_PROMPTS} prompts at once (one a line), got {len(lines)}")
    settings = {
        "prompt": lines,
        "num_images_per_prompt": _whole("number of pictures", num_images, 1, MAX_IMAGES),
        "guidance_scale": _real("guidance", guidance_scale, 0, 20),
        "temperature": _real("temperature", temperature, 0.01, 10),
        "top_k": _whole("top-k", top_k, 0, pipe.prior.config.codebook_size) or None,  # 0: off
        "top_p": _real("top-p", top_p, 0.01, 1),
        "num_candidates": _whole("candidates", num_candidates, 1, MAX_CANDIDATES),
        "rerank": rerank,
        "seed": _whole("seed", seed, 0, MAX_SEED),
    }
    if settings["top_p"] == 1:
        settings["top_p"] = None  # off
    if rerank not in RERANKERS:
        raise _error(f"the reranker must be one of {', '.join(RERANKERS)}, got {rerank!r}")
    samples = len(lines) * settings["num_images_per_prompt"] * settings["num_candidates"]
    if samples > MAX_SAMPLES:
        raise _error(
            f"that asks for {samples} samples (prompts × pictures × candidates); at most {MAX_SAMPLES} at once"
        )
    return settings


def command_line(settings: dict[str, Any], model: str) -> str:
    """The `vqclip generate` command that draws the same pictures."""
    words = ["vqclip", "generate", *settings["prompt"], "--model", model]
    words += ["-n", settings["num_images_per_prompt"], "--guidance-scale", settings["guidance_scale"]]
    words += ["--temperature", settings["temperature"]]
    words += [] if settings["top_k"] is None else ["--top-k", settings["top_k"]]
    words += [] if settings["top_p"] is None else ["--top-p", settings["top_p"]]
    words += ["--num-candidates", settings["num_candidates"], "--rerank", settings["rerank"]]
    words += ["--seed", settings["seed"]]
    return shlex.join(str(word) for word in words)


def uploaded_picture(upload: Any) -> Any:
    """The picture of an upload (gradio's file payload), or None without one; raises gr.Error for a file that is
    no usable picture or is too large."""
    if upload is None:
        return None
    path = upload.get("path") if isinstance(upload, dict) else None
    if not isinstance(path, str):
        raise _error("the upload did not arrive; upload the picture again")
    try:
        return load_image(path, max_pixels=MAX_UPLOAD_PIXELS)
    except BadImage as err:
        raise _error(
            f"that upload is no usable picture ({err.reason}): upload a PNG or JPEG of at most 4096×4096"
        ) from err


def _thumbnail(picture: Image.Image, side: int = 2 * CELL) -> Image.Image:
    """The picture, shrunk to fit `side` × `side` if larger (an indexed photo may be thousands of pixels)."""
    picture = picture.copy()
    picture.thumbnail((side, side))
    return picture


def _captions(out: Any) -> list[str]:
    """Each picture's prompt and scores, for a gallery."""
    scores, likelihoods = out.scores.tolist(), out.log_likelihoods.tolist()
    return [
        f"{prompt} · score {score:.3f} · log-likelihood {ll:.2f}"
        for prompt, score, ll in zip(out.prompts, scores, likelihoods, strict=True)
    ]


def painted_mask(layers: Any, size: tuple[int, int]) -> np.ndarray | None:
    """(height, width) bool: where the editor's layers (gradio's file payloads) are painted, at the picture's
    `size`; None where nothing is painted."""
    if not isinstance(layers, list):
        raise _error("the painted region did not arrive; paint it again")
    painted = np.zeros(size[::-1], bool)
    for layer in layers:
        path = layer.get("path") if isinstance(layer, dict) else None
        if not isinstance(path, str):
            raise _error("the painted region did not arrive; paint it again")
        try:
            with Image.open(path) as drawn:
                if drawn.width * drawn.height > MAX_UPLOAD_PIXELS:
                    raise _error("the painted layer is larger than 4096×4096")
                alpha = drawn.convert("RGBA").getchannel("A")
        except (OSError, ValueError) as err:
            raise _error("the painted region is not a picture; paint it again") from err
        painted |= np.asarray(alpha.resize(size, Image.Resampling.NEAREST)) > 0
    return painted if painted.any() else None


def edit_inputs(editor: Any, box: tuple[Any, Any, Any, Any]) -> tuple[Image.Image, Any]:
    """The picture and the region to redraw from the Edit tab: the painted region, else the box (left, top,
    right, bottom in the picture's pixels); raises gr.Error when either is missing or unusable."""
    if not isinstance(editor, dict) or editor.get("background") is None:
        raise _error("upload a picture to edit first")
    picture = uploaded_picture(editor["background"])
    painted = painted_mask(editor.get("layers") or [], picture.size)
    if painted is not None:
        return picture, painted
    names = ("left", "top", "right", "bottom")
    numbers = tuple(_real(f"the box's {name}", value, 0, 4096) for name, value in zip(names, box, strict=True))
    if not any(numbers):
        raise _error("paint the region to redraw, or give a box")
    return picture, numbers


def sampling_controls(defaults: dict[str, Any], tab: str) -> list[Any]:
    """A tab's sampling fields (guidance, temperature, top-k, top-p, candidates, reranker), filled with `defaults`
    (the model's sampling or edit sampling settings), in an accordion; call inside a gradio Blocks."""
    import gradio as gr

    with gr.Accordion("sampling (the model's defaults)", open=False, elem_id=f"{tab}-sampling"):
        return [
            gr.Slider(0, 20, value=defaults["guidance_scale"], step=0.1, label="guidance"),
            gr.Slider(0.01, 2, value=defaults["temperature"], step=0.01, label="temperature"),
            gr.Number(defaults["top_k"] or 0, precision=0, minimum=0, label="top-k (0: off)"),
            gr.Slider(0.01, 1, value=defaults["top_p"] or 1, step=0.01, label="top-p (1: off)"),
            gr.Slider(
                1,
                MAX_CANDIDATES,
                value=defaults["num_candidates"],
                step=1,
                label="candidates (samples per picture; the best is kept)",
            ),
            gr.Dropdown(list(RERANKERS), value=defaults["rerank"], label="reranker"),
        ]


def build_app(
    pipe: TextToImagePipeline,
    search: ImageSearchPipeline | None,
    *,
    model_name: str = "models/shapes-demo",
    queue_size: int = QUEUE_SIZE,
) -> Any:
    """The gradio app: Generate, Edit and Search tabs over one loaded model (`search` None leaves Search out)."""
    import gradio as gr

    worker = ModelWorker()
    tracker = gr.Progress()  # gradio gives each request its own from this default

    def generate(prompts, num_images, guidance_scale, temperature, top_k, top_p, num_candidates, rerank, seed,
                 progress=tracker):  # fmt: skip
        settings = generation_settings(
            pipe, prompts, num_images, guidance_scale, temperature, top_k, top_p, num_candidates, rerank, seed
        )
        seed = settings.pop("seed")
        start = time.perf_counter()

        def call(on_step):
            generator = torch.Generator(pipe.device).manual_seed(seed)
            return pipe(**settings, generator=generator, show_progress=False, callback=on_step)

        try:
            out = yield from worker.run(call, progress, (gr.skip(),) * 4)
        except ValueError as err:
            raise _error(str(err)) from err
        captions = _captions(out)
        grid_labels = [f"{score:.2f} {prompt}" for prompt, score in zip(out.prompts, out.scores.tolist(), strict=True)]
        grid = make_grid(out.images, grid_labels, columns=settings["num_images_per_prompt"], cell=CELL)
        seconds = time.perf_counter() - start
        status = (
            f"{len(out.images)} pictures in {seconds:.1f} s with seed **{seed}**. The same pictures from the "
            f"command line:\n\n```\n{command_line({**settings, 'seed': seed}, model_name)}\n```"
        )
        yield list(zip(out.images, captions, strict=True)), grid, status, list(out.images)

    def pick(pictures, selected: gr.SelectData):
        """A picture of the Generate tab's gallery, clicked, becomes the Edit tab's picture (from this session's
        own results, never from a path the page sends)."""
        index = selected.index
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(pictures or []):
            return gr.skip(), gr.skip()
        return pictures[index], gr.Tabs(selected="edit")

    pick.__annotations__["selected"] = gr.SelectData  # gradio finds the event's data by this type, not a string

    def edit(editor, prompts, num_images, guidance_scale, temperature, top_k, top_p, num_candidates, rerank, seed,
             left, top, right, bottom, progress=tracker):  # fmt: skip
        settings = generation_settings(
            pipe, prompts, num_images, guidance_scale, temperature, top_k, top_p, num_candidates, rerank, seed
        )
        seed = settings.pop("seed")
        picture, region = edit_inputs(editor, (left, top, right, bottom))

        def call(on_step):
            generator = torch.Generator(pipe.device).manual_seed(seed)
            return pipe.edit(picture, region, **settings, generator=generator, show_progress=False, callback=on_step)

        try:
            out = yield from worker.run(call, progress, (gr.skip(), gr.skip()))
        except ValueError as err:
            raise _error(str(err)) from err
        shown = [(picture, "the picture"), *zip(out.images, _captions(out), strict=True)]
        yield shown, f"{len(out.images)} edits with seed **{seed}**; the first picture is the input"

    def find(query, upload, k):
        k = _whole("number of results", k, 1, MAX_RESULTS)
        picture = uploaded_picture(upload)
        query = query.strip() if isinstance(query, str) else ""
        if picture is None and not query:
            raise _error('type what to look for, e.g. "a red ball", or upload a picture')
        if len(query) > 1000:
            raise _error("the query must be at most 1,000 characters")
        with worker.lock:
            hits = search(picture if picture is not None else query, k=k)
        by = "the uploaded picture" if picture is not None else f'"{query}"'
        results = [(_thumbnail(hit_image(hit.source, CELL)), f"{hit.score:.3f} · {hit.caption}") for hit in hits]
        return results, f"the {len(hits)} best of {len(search.index)} pictures for {by}"

    with gr.Blocks(title="vqclip", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"# vqclip\nText-to-image generation and search with `{model_name}`.")
        pictures = gr.State([])  # this session's last generated pictures, for the Edit tab
        with gr.Tabs() as tabs:
            with gr.Tab("Generate"):
                with gr.Row():
                    with gr.Column(scale=1):
                        prompts = gr.Textbox(
                            label="prompts (one a line)", value="a blue ball on grass", lines=3, elem_id="prompts",
                            max_length=MAX_PROMPT_TEXT,
                        )  # fmt: skip
                        num_images = gr.Slider(
                            1, MAX_IMAGES, value=4, step=1, label="pictures per prompt", elem_id="num-images"
                        )
                        sampling = sampling_controls(pipe.sampling, "generate")
                        seed = gr.Number(0, precision=0, minimum=0, maximum=MAX_SEED, label="seed")
                        generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                    with gr.Column(scale=2):
                        gallery = gr.Gallery(
                            label="pictures", columns=4, format="png", elem_id="gallery", preview=False, height="auto"
                        )
                        status = gr.Markdown(elem_id="status")
                        grid = gr.Image(label="grid (download)", type="pil", format="png", interactive=False)
                generate_button.click(
                    generate,
                    [prompts, num_images, *sampling, seed],
                    [gallery, grid, status, pictures],
                    api_name="generate", concurrency_id="model", concurrency_limit=1,
                )  # fmt: skip
            with gr.Tab("Edit", id="edit"):
                with gr.Row():
                    with gr.Column(scale=1):
                        editor = gr.ImageMask(
                            label="the picture (upload one, or click one in Generate): paint the region to redraw",
                            sources=["upload"], type="filepath", elem_id="editor",
                            layers=False, brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed"),
                        )  # fmt: skip
                        with gr.Row():
                            labels = {"left": "or a box: left", "top": "top", "right": "right", "bottom": "bottom"}
                            box = [
                                gr.Number(0, minimum=0, label=label, elem_id=f"box-{name}")
                                for name, label in labels.items()
                            ]
                        edit_prompts = gr.Textbox(label="prompts (one a line)", value="a red star on grass", lines=2)
                        edit_count = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="edits per prompt")
                        edit_sampling = sampling_controls(pipe.edit_sampling, "edit")
                        edit_seed = gr.Number(0, precision=0, minimum=0, maximum=MAX_SEED, label="seed")
                        edit_button = gr.Button("Edit", variant="primary", elem_id="edit-button")
                    with gr.Column(scale=2):
                        edits = gr.Gallery(
                            label="the picture and its edits", columns=4, format="png", preview=False, elem_id="edits"
                        )
                        edit_status = gr.Markdown(elem_id="edit-status")
                edit_button.click(
                    edit,
                    [editor, edit_prompts, edit_count, *edit_sampling, edit_seed, *box],
                    [edits, edit_status],
                    api_name="edit", preprocess=False, concurrency_id="model", concurrency_limit=1,
                )  # fmt: skip
                gallery.select(pick, [pictures], [editor, tabs], api_visibility="private")
            if search is not None:
                with gr.Tab("Search"):
                    with gr.Row():
                        with gr.Column(scale=1):
                            query = gr.Textbox(label="text", value="a red ball", elem_id="query")
                            upload = gr.Image(label="or a picture", type="filepath", sources=["upload"])
                            k = gr.Slider(1, MAX_RESULTS, value=8, step=1, label="results")
                            search_button = gr.Button("Search", variant="primary", elem_id="search")
                        with gr.Column(scale=2):
                            results = gr.Gallery(label="results", columns=4, format="png", preview=False)
                            found = gr.Markdown()
                    search_button.click(
                        find, [query, upload, k], [results, found], api_name="search", preprocess=False,
                        concurrency_id="model", concurrency_limit=1,
                    )  # fmt: skip
    demo.queue(max_size=queue_size, default_concurrency_limit=1, api_open=False)
    demo.worker = worker
    return demo


def launch(demo: Any, host: str = "127.0.0.1", port: int | None = 7860, blocked: list[str] = (), **kwargs: Any):
    """Start the server (blocking unless `prevent_thread_lock=True`); `blocked` folders are never served."""
    return demo.launch(
        server_name=host, server_port=port, show_error=True, max_file_size=MAX_UPLOAD, allowed_paths=[],
        blocked_paths=[str(Path(path).resolve()) for path in blocked], ssr_mode=False, share=False,
        enable_monitoring=False, **kwargs,
    )  # fmt: skip


def _search_pipeline(pipe: TextToImagePipeline, index_dir: str | None, world: Path, world_images: int):
    """Search over `index_dir` (with the pipeline's contrastive model when it made the index, else the model the
    index records), or over a small shapes world built in `world`."""
    from app.demo import shapes_index
    from common.hub import ModelLoadError
    from contrastive.index import ImageIndex

    if index_dir is None:
        print(f"building a search index of {world_images} shapes-world pictures ...")
        index, _ = shapes_index(pipe.contrastive, world, world_images, seed=0)
        return ImageSearchPipeline(pipe.contrastive, index)
    index = ImageIndex.load(index_dir)
    try:
        return ImageSearchPipeline(pipe.contrastive, index)
    except ModelLoadError:  # made by another contrastive model: load that one as well
        return ImageSearchPipeline.from_pretrained(None, index_dir)


def _serve(args: argparse.Namespace) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
    try:
        import gradio  # noqa: F401
    except ImportError as err:
        raise ValueError("vqclip serve needs gradio: pip install -e '.[web]'") from err
    from pipelines.text_to_image import DEMO_MODEL

    model = args.model or str(DEMO_MODEL)
    pipe = TextToImagePipeline.from_pretrained(model).to(args.device)
    with tempfile.TemporaryDirectory(prefix="vqclip-serve-") as scratch:
        search = _search_pipeline(pipe, args.index, Path(scratch) / "shapes", args.world_images)
        name = args.model or os.path.relpath(DEMO_MODEL)
        demo = build_app(pipe, search, model_name=name, queue_size=args.queue_size)
        blocked = [model, scratch] + ([args.index] if args.index else [])
        launch(demo, args.host, args.port, blocked)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="generate, edit and search in the browser (needs the web extra)")
    serve.add_argument("--model", help="a pipeline folder (default: the released models/shapes-demo)")
    serve.add_argument("--index", help="a search index folder (default: a small shapes world, built at start)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=integer(1, 65535), default=7860, help="port (default: %(default)s)")
    serve.add_argument(
        "--queue-size", type=integer(1, 1000), default=QUEUE_SIZE, help="requests that may wait; more are answered busy"
    )
    serve.add_argument(
        "--world-images", type=integer(2, 100_000), default=200, help="size of the shapes world built without --index"
    )
    add_device_arg(serve)
    serve.set_defaults(func=_serve)
