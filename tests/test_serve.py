"""`vqclip serve`: the gradio app, launched in this process and driven by gradio_client and by headless Chromium."""

import json
import os
import shutil
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

gr = pytest.importorskip("gradio")  # the web extra
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from gradio_client.utils import QueueError  # noqa: E402

from app import serve  # noqa: E402
from app.cli import main  # noqa: E402
from app.demo import shapes_index  # noqa: E402
from contrastive.model import PRESETS as CLIP_PRESETS  # noqa: E402
from contrastive.model import ContrastiveModel  # noqa: E402
from pipelines.image_search import ImageSearchPipeline  # noqa: E402
from pipelines.text_to_image import TextToImagePipeline  # noqa: E402
from prior.model import Prior, PriorConfig  # noqa: E402
from vqvae.model import PRESETS as VQ_PRESETS  # noqa: E402
from vqvae.model import VQVAE  # noqa: E402

PRIOR = PriorConfig(codebook_size=16, grid_size=8, text_width=32, text_length=16, dim=32, layers=1, heads=2)
# prompt, pictures, guidance, temperature, top-k (0: off), top-p (1: off), candidates, reranker, seed
REQUEST = ("a blue ball on grass\na red star", 2, 2.0, 0.9, 10, 0.95, 2, "contrastive+likelihood", 7)


def _pipe(seed: int = 0) -> TextToImagePipeline:
    torch.manual_seed(seed)
    stages = VQVAE(VQ_PRESETS["tiny"]), ContrastiveModel(CLIP_PRESETS["tiny"]), Prior(PRIOR)
    return TextToImagePipeline(*stages, edit_sampling={"guidance_scale": 2.5, "num_candidates": 3})


def _start(pipe, tmp_path_factory, **options):
    world = tmp_path_factory.mktemp("world")
    index, _ = shapes_index(pipe.contrastive, world / "shapes", 20, seed=0)
    demo = serve.build_app(pipe, ImageSearchPipeline(pipe.contrastive, index), **options)
    serve.launch(demo, port=None, blocked=[str(world)], prevent_thread_lock=True, quiet=True)
    return demo, world


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pipe = _pipe()
    demo, world = _start(pipe, tmp_path_factory)
    client = Client(demo.local_url, verbose=False)
    yield pipe, demo, client, world
    client.close()
    demo.close()


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    """A server whose model takes over 30 ms a drawing step (15 s for BIG) and whose queue holds one request."""
    pipe = _pipe()
    pipe.prior.blocks[0].register_forward_pre_hook(lambda module, args: time.sleep(0.03))
    demo, _ = _start(pipe, tmp_path_factory, queue_size=1)
    yield demo
    demo.close()


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_returns_the_pictures_of_the_python_api_for_the_same_seed(server):
    pipe, _, client, _ = server
    gallery, grid, status = client.predict(*REQUEST, api_name="/generate")
    assert len(gallery) == 4 and Image.open(grid).size[0] >= 2 * serve.CELL
    expected = pipe(
        ["a blue ball on grass", "a red star"], num_images_per_prompt=2, guidance_scale=2.0, temperature=0.9,
        top_k=10, top_p=0.95, num_candidates=2, rerank="contrastive+likelihood",
        generator=torch.Generator().manual_seed(7), show_progress=False,
    )  # fmt: skip
    for shown, image, prompt, score in zip(gallery, expected.images, expected.prompts, expected.scores, strict=True):
        assert np.array_equal(_pixels(shown["image"]), np.asarray(image))
        assert shown["caption"].startswith(f"{prompt} · score {score:.3f}")
    assert "seed **7**" in status and "--seed 7" in status and "--top-k 10" in status
    other, _, _ = client.predict(*REQUEST[:-1], 8, api_name="/generate")
    assert not np.array_equal(_pixels(other[0]["image"]), _pixels(gallery[0]["image"]))


def test_the_model_defaults_fill_the_form(server):
    """Generate shows the model's sampling settings; Edit its edit sampling settings, which differ here."""
    pipe, demo, _, _ = server
    components = [b for b in demo.blocks.values() if isinstance(b, gr.components.Component)]

    def values(label: str) -> list:
        return [b.value for b in components if b.label == label]

    assert pipe.sampling["guidance_scale"] != pipe.edit_sampling["guidance_scale"]
    assert values("guidance") == [pipe.sampling["guidance_scale"], pipe.edit_sampling["guidance_scale"]]
    assert values("temperature") == [pipe.sampling["temperature"], pipe.edit_sampling["temperature"]]
    assert values("reranker") == [pipe.sampling["rerank"], pipe.edit_sampling["rerank"]]
    assert values("candidates (samples per picture; the best is kept)") == [1, 3]


def test_search_by_text_and_by_picture(server):
    pipe, _, client, world = server
    hits, summary = client.predict("a red ball", None, 5, api_name="/search")
    assert len(hits) == 5 and "of 20 pictures" in summary
    assert all(Image.open(hit["image"]).size == (64, 64) for hit in hits)  # the indexed pictures themselves
    scores = [float(hit["caption"].split(" · ")[0]) for hit in hits]
    assert scores == sorted(scores, reverse=True)
    picture = sorted((world / "shapes" / "train").glob("*.png"))[0]
    copy = world.parent / "query.png"  # the fixture's world is a blocked folder: upload a copy
    shutil.copy(picture, copy)
    by_picture, summary = client.predict("", handle_file(str(copy)), 3, api_name="/search")
    assert len(by_picture) == 3 and "uploaded picture" in summary
    assert float(by_picture[0]["caption"].split(" · ")[0]) == pytest.approx(1.0, abs=1e-3)  # itself


def _editor(background, layer=None) -> dict:
    return {"background": handle_file(str(background)), "layers": [handle_file(str(layer))] if layer else [],
            "composite": None}  # fmt: skip


def test_edit_with_a_box_or_a_painted_region_gives_the_python_api_edits(server, tmp_path):
    pipe, _, client, world = server
    picture = tmp_path / "picture.png"
    shutil.copy(sorted((world / "shapes" / "train").glob("*.png"))[0], picture)
    layer = np.zeros((64, 64, 4), np.uint8)
    layer[40:, 8:30] = (255, 0, 255, 255)  # painted strokes: opaque where drawn, transparent elsewhere
    Image.fromarray(layer).save(tmp_path / "layer.png")
    settings = dict(num_images_per_prompt=2, guidance_scale=2.0, temperature=0.9, top_k=10, top_p=0.95,
                    num_candidates=2, rerank="contrastive+likelihood", show_progress=False)  # fmt: skip
    for editor, box, region in [
        (_editor(picture), (0, 32, 64, 64), (0, 32, 64, 64)),
        (_editor(picture, tmp_path / "layer.png"), (0, 0, 0, 0), layer[..., 3] > 0),
    ]:
        shown, status = client.predict(editor, "a red star", *REQUEST[1:], *box, api_name="/edit")
        expected = pipe.edit(Image.open(picture), region, "a red star", generator=torch.Generator().manual_seed(7),
                             **settings)  # fmt: skip
        assert len(shown) == 3 and shown[0]["caption"] == "the picture" and "seed **7**" in status
        assert np.array_equal(_pixels(shown[0]["image"]), _pixels(picture))
        for edited, image in zip(shown[1:], expected.images, strict=True):
            assert np.array_equal(_pixels(edited["image"]), np.asarray(image))


def test_bad_edit_requests_get_a_message(server, bad_files, tmp_path):
    _, _, client, world = server
    picture = tmp_path / "picture.png"
    shutil.copy(sorted((world / "shapes" / "train").glob("*.png"))[0], picture)
    cases = [
        (None, (0, 0, 0, 0), "upload a picture to edit first"),
        (_editor(picture), (0, 0, 0, 0), "paint the region to redraw, or give a box"),
        (_editor(picture), (0, 0, 100, 64), "reaches outside the 64x64 picture"),
        (_editor(picture), (0, 0, 1e9, 64), "the box's right must be a number from 0 to 4096"),
        (_editor(bad_files / "huge.png"), (0, 0, 8, 8), "no usable picture \\(image too large\\)"),
        (_editor(picture, bad_files / "notes.png"), (0, 0, 8, 8), "the painted region is not a picture"),
    ]
    for editor, box, message in cases:
        with pytest.raises(AppError, match=message):
            client.predict(editor, "a red star", *REQUEST[1:], *box, api_name="/edit")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "notes.png").write_text("not a picture")
    Image.new("1", (20_000, 20_000)).save(folder / "huge.png")  # 400 million pixels in a 50 kB file
    return folder


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (("   \n ", *REQUEST[1:]), "write a prompt first"),
        (("\n".join(["a ball"] * 9), *REQUEST[1:]), "at most 8 prompts"),
        ((REQUEST[0], 10**9, *REQUEST[2:]), "greater than maximum value 16"),
        ((REQUEST[0], 16, *REQUEST[2:6], 16, *REQUEST[7:]), "at most 256 at once"),
        ((*REQUEST[:4], 17, *REQUEST[5:]), "top-k must be a whole number from 0 to 16"),
        ((*REQUEST[:7], "best", REQUEST[8]), "not in the list of choices"),
        ((*REQUEST[:8], -1), "less than minimum value 0"),
    ],
)
def test_bad_generation_requests_get_a_message(server, request_, message):
    _, _, client, _ = server
    with pytest.raises(AppError, match=message):
        client.predict(*request_, api_name="/generate")


@pytest.mark.parametrize(
    ("query", "upload", "k", "message"),
    [
        ("", None, 3, "type what to look for"),
        ("a red ball", None, 10**6, "number of results must be a whole number from 1 to 32"),
        ("", "notes.png", 3, "no usable picture \\(unreadable image\\)"),
        ("", "huge.png", 3, "no usable picture \\(image too large\\)"),
    ],
)
def test_bad_search_requests_get_a_message(server, bad_files, query, upload, k, message):
    _, _, client, _ = server
    with pytest.raises(AppError, match=message):
        client.predict(query, upload and handle_file(str(bad_files / upload)), k, api_name="/search")


def test_uploads_are_capped_and_no_server_file_is_readable(server):
    pipe, demo, _, world = server
    url = demo.local_url
    too_big = httpx.post(f"{url}gradio_api/upload", files={"files": ("big.png", b"\0" * 11_000_000)})
    assert too_big.status_code == 413
    picture = sorted((world / "shapes" / "train").glob("*.png"))[0]
    for path in ("/etc/passwd", str(picture), serve.__file__):
        assert httpx.get(f"{url}gradio_api/file={path}").status_code == 403
    # a request naming a file on the server as if it had been uploaded is refused
    fn_index = next(i for i, fn in demo.fns.items() if fn.api_name == "search")
    body = {"data": ["", {"path": str(picture), "meta": {"_type": "gradio.FileData"}}, 3], "fn_index": fn_index,
            "session_hash": "forged", "trigger_id": None}  # fmt: skip
    assert httpx.post(f"{url}gradio_api/queue/join", json=body).status_code == 200
    outcome = _completed(url, "forged")
    assert outcome["success"] is False and "blocked" in outcome["output"]["error"]


def test_no_request_skips_the_queue(server):
    _, demo, _, _ = server
    for route in ("run/generate", "api/generate"):
        answer = httpx.post(f"{demo.local_url}gradio_api/{route}", json={"data": list(REQUEST)})
        assert answer.status_code == 404 and "join the queue" in answer.text


def _completed(url: str, session_hash: str) -> dict:
    with httpx.stream("GET", f"{url}gradio_api/queue/data", params={"session_hash": session_hash}, timeout=30) as s:
        for line in s.iter_lines():
            if line.startswith("data:") and (message := json.loads(line[5:]))["msg"] == "process_completed":
                return message
    raise AssertionError("the event never completed")


def test_it_listens_on_localhost_unless_told_otherwise(server):
    _, demo, _, _ = server
    assert demo.server_name == "127.0.0.1"
    assert serve.launch.__defaults__[0] == "127.0.0.1"
    from app.cli import build_parser

    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"


def test_bad_command_line_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vqclip serve: error:") and err.count("\n") == 1


BIG = ("a blue ball", 16, 1.0, 1.0, 0, 1.0, 16, "contrastive", 0)  # 256 samples: 8 batches of 64 drawing steps


def _wait_for(condition, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _stops(worker) -> None:
    """The model call stops within a few seconds (of the 15 it would take) and frees the model."""
    _wait_for(lambda: not worker.lock.locked(), seconds=5.0)
    steps = worker.steps
    time.sleep(0.5)
    assert worker.steps == steps


def test_a_full_queue_answers_busy_at_once_and_a_cancelled_request_stops(slow_server):
    worker = slow_server.worker
    # one client (one browser tab) each: gradio's cancel stops every run of its session's function
    clients = [Client(slow_server.local_url, verbose=False) for _ in range(3)]
    running = clients[0].submit(*BIG, api_name="/generate")
    _wait_for(lambda: worker.steps > 0)
    waiting = clients[1].submit(*BIG, api_name="/generate")
    _wait_for(lambda: waiting.status().code.name == "IN_QUEUE")
    start = time.monotonic()
    with pytest.raises(QueueError):
        clients[2].submit(*BIG, api_name="/generate").result(timeout=10)
    assert time.monotonic() - start < 3
    waiting.cancel()
    running.cancel()
    _stops(worker)
    assert not running.done() or running.status().code.name in ("CANCELLED", "FINISHED")
    for client in clients:
        client.close()


def test_a_request_dropped_without_being_closed_stops_its_model_call(monkeypatch):
    """gradio may cancel a request's task before it keeps hold of the request: nobody closes it then."""
    monkeypatch.setattr(serve, "ABANDONED_SECONDS", 0.5)
    worker, steps = serve.ModelWorker(), []

    def call(on_step):
        for step in range(1000):
            time.sleep(0.01)
            on_step(step, 1000)
            steps.append(step)

    request = worker.run(call, lambda *args, **kwargs: None, None)
    next(request)  # polled once, then neither polled again nor closed
    _wait_for(lambda: not worker.lock.locked(), seconds=5.0)
    assert 0 < len(steps) < 1000


def test_a_client_that_leaves_leaves_no_work_running(slow_server):
    url, worker = slow_server.local_url, slow_server.worker
    fn_index = next(i for i, fn in slow_server.fns.items() if fn.api_name == "generate")
    body = {"data": list(BIG), "fn_index": fn_index, "session_hash": "leaves", "trigger_id": None}
    assert httpx.post(f"{url}gradio_api/queue/join", json=body).status_code == 200
    before = worker.steps
    with httpx.stream("GET", f"{url}gradio_api/queue/data", params={"session_hash": "leaves"}, timeout=30) as s:
        for line in s.iter_lines():  # progress arrives as the codes are drawn
            if '"progress"' in line and worker.steps > before:
                break
    # the connection is closed: the tab is gone
    _stops(worker)
    assert worker.steps - before < 256  # of the 512 drawing steps asked for


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def browse(url: str, prompt: str, pictures: int, screenshot, user_data_dir, edit_box=None) -> dict:
    """Open the page in headless Chromium, ask for `pictures` pictures of `prompt`, wait for the gallery and save a
    screenshot. With `edit_box` (left, top, right, bottom), then click the first picture, which opens it in the
    Edit tab, and redraw that box. Returns how many pictures each gallery shows."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 f"--user-data-dir={user_data_dir}", "--window-size=1280,1000"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))

    def type_into(selector: str, text: str) -> None:
        field = driver.find_element(By.CSS_SELECTOR, selector)
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(text, Keys.TAB)

    def shown(gallery: str, status: str, says: str) -> int:
        wait.until(lambda d: says in d.find_element(By.ID, status).text)
        drawn = f"return [...document.querySelectorAll('#{gallery} img')].every(i => i.complete && i.naturalWidth > 0)"
        wait.until(lambda d: d.execute_script(drawn))  # every picture has arrived and is drawn
        return len(driver.find_elements(By.CSS_SELECTOR, f"#{gallery} img"))

    try:
        driver.get(url)
        wait = WebDriverWait(driver, 120)
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompts textarea"))
        box.clear()
        box.send_keys(prompt)
        type_into("#num-images input[type=number]", str(pictures))
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        counts = {"generated": shown("gallery", "status", "pictures in")}
        driver.save_screenshot(str(screenshot))
        if edit_box is not None:
            driver.find_element(By.CSS_SELECTOR, "#gallery img").click()
            wait.until(lambda d: d.find_element(By.ID, "edit-button").is_displayed())
            for name, value in zip(("left", "top", "right", "bottom"), edit_box, strict=True):
                type_into(f"#box-{name} input", str(value))
            driver.find_element(By.ID, "edit-button").click()
            counts["edited"] = shown("edits", "edit-status", "edits with seed")
        return counts
    finally:
        driver.quit()


@pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER) and not os.environ.get("CI"), reason="needs chromium and chromium-driver"
)
def test_in_a_real_browser(server, tmp_path):
    _, demo, _, _ = server
    screenshot = tmp_path / "serve.png"
    counts = browse(demo.local_url, "a red star in the night sky", 3, screenshot, tmp_path / "profile", (0, 8, 16, 16))
    assert counts == {"generated": 3, "edited": 1 + 4}  # the picture clicked, and its four edits
    assert Image.open(screenshot).size[0] > 0
