"""The Gradio demo (hfgen.demo): the app through gradio_client, a real headless Chromium, the Space, the push."""

import contextlib
import importlib.metadata
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

gr = pytest.importorskip("gradio", reason='the demo tests need gradio: pip install "hfgen[test]"')
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       FlowMatchEulerDiscreteScheduler, PNDMScheduler)
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

import hfgen  # noqa: E402
from hfgen.demo import build_demo, scheduler_choices, write_space  # noqa: E402

from helpers import quick_training_args, tiny_unet  # noqa: E402
from hub_fixtures import hub_server  # noqa: E402, F401  (the fixture)

NAMES = {"0": "cat", "1": "dog", "2": "fox"}


def tiny_cvae() -> hfgen.ConditionalPipeline:
    torch.manual_seed(0)
    return hfgen.ConditionalPipeline(hfgen.VAEModel(latent_dim=4, hidden_dims=[16], num_classes=3, id2label=NAMES))


def tiny_vae() -> hfgen.VAEPipeline:
    torch.manual_seed(0)
    return hfgen.VAEPipeline(hfgen.VAEModel(latent_dim=4, hidden_dims=[16], sample_size=8))


def tiny_ddpm(label_dropout=0.1) -> hfgen.DDPMPipeline:
    return hfgen.DDPMPipeline(tiny_unet(num_class_embeds=4), DDPMScheduler(num_train_timesteps=20), label_dropout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def served(demo):
    """The app on a free loopback port: yields its URL."""
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield url
    finally:
        demo.close()


def served_client(url) -> Client:
    """A client of a local app that reads its output files where the server wrote them (no download over HTTP)."""
    return Client(url, verbose=False, download_files=False)


def local(file):
    """A file output of `served_client` (a FileData dict) or a path -> the path."""
    return file["path"] if isinstance(file, dict) else file


def pixels(images) -> list[np.ndarray]:
    """Gallery output (files) or PIL images -> uint8 arrays."""
    return [np.asarray(PIL.Image.open(local(item["image"])) if isinstance(item, dict) else item) for item in images]


def api(url) -> dict[str, list[str]]:
    endpoints = served_client(url).view_api(return_format="dict", print_info=False)["named_endpoints"]
    return {name: [p["parameter_name"] for p in info["parameters"]] for name, info in endpoints.items()}


def pipeline_error(call) -> str:
    with pytest.raises(ValueError) as info:
        call()
    return str(info.value)


@pytest.fixture(scope="module")
def cvae_app():
    pipe = tiny_cvae()
    with served(build_demo(pipe)) as url:
        yield pipe, url


@pytest.fixture(scope="module")
def vae_app():
    pipe = tiny_vae()
    with served(build_demo(pipe)) as url:
        yield pipe, url


def test_the_app_samples_the_pipelines_images_for_the_same_seed(cvae_app, vae_app):
    for (pipe, url), labels in ((cvae_app, "dog"), (vae_app, None)):
        client = served_client(url)
        kwargs = {"class_labels": labels} if labels else {}
        images, download = client.predict(num_images=4, seed=3, **kwargs, api_name="/sample")
        expected = pipe(4, generator=torch.manual_seed(3), **kwargs).images
        assert len(images) == 4
        for got, want in zip(pixels(images), pixels(expected)):
            np.testing.assert_array_equal(got, want)
        with zipfile.ZipFile(local(download)) as archive:
            assert len(archive.namelist()) == 4
            np.testing.assert_array_equal(np.asarray(PIL.Image.open(archive.open(archive.namelist()[0]))),
                                          pixels(expected)[0])


def test_diffusion_app_offers_schedulers_steps_and_guidance():
    pipe = tiny_ddpm()
    with served(build_demo(pipe)) as url:
        assert api(url)["/sample"] == ["num_images", "seed", "class_labels", "scheduler", "num_inference_steps",
                                       "guidance_scale"]
        images, _ = served_client(url).predict(2, 5, "1", "DDIM", 3, 2.0, api_name="/sample")
    reference = tiny_ddpm()
    reference.scheduler = DDIMScheduler.from_config(reference.scheduler.config)
    expected = reference(2, class_labels=1, num_inference_steps=3, guidance_scale=2.0,
                         generator=torch.manual_seed(5)).images
    for got, want in zip(pixels(images), pixels(expected)):
        np.testing.assert_array_equal(got, want)
    assert isinstance(pipe.scheduler, DDIMScheduler)  # the app swapped the sampler, as a user would
    # without a trained null class there is no guidance to offer
    with served(build_demo(tiny_ddpm(label_dropout=0.0))) as url:
        assert "guidance_scale" not in api(url)["/sample"]


def test_text_to_image_app_takes_prompts_and_guidance():
    from test_text_to_image import tiny_text_pipeline

    pipe = tiny_text_pipeline()
    with served(build_demo(pipe)) as url:
        assert api(url)["/sample"] == ["num_images", "seed", "prompt", "negative_prompt", "scheduler",
                                       "num_inference_steps", "guidance_scale"]
        images, _ = served_client(url).predict(2, 5, "a thick seven", "a one", "DDIM", 3, 2.0,
                                               api_name="/sample")
    reference = tiny_text_pipeline()
    reference.scheduler = DDIMScheduler.from_config(reference.scheduler.config)
    expected = reference(2, prompt="a thick seven", negative_prompt="a one", num_inference_steps=3,
                         guidance_scale=2.0, generator=torch.manual_seed(5)).images
    for got, want in zip(pixels(images), pixels(expected)):
        np.testing.assert_array_equal(got, want)


def test_scheduler_choices_follow_the_pipelines_scheduler():
    assert list(scheduler_choices(DDPMScheduler())) == ["DDPM", "DDIM", "DPM-Solver++"]
    assert list(scheduler_choices(DPMSolverMultistepScheduler())) == ["DDPM", "DDIM", "DPM-Solver++"]
    flow_choices = scheduler_choices(FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert list(flow_choices) == ["FlowMatchEuler", "FlowMatchHeun", "DPM-Solver++"]
    flow_solver = flow_choices["DPM-Solver++"][1](FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert flow_solver.config.use_flow_sigmas and flow_solver.config.flow_shift == 3.0  # the flow's own sigmas
    assert list(scheduler_choices(flow_solver)) == list(flow_choices)
    assert list(scheduler_choices(PNDMScheduler())) == ["PNDMScheduler", "DDPM", "DDIM", "DPM-Solver++"]


def test_bad_input_shows_the_pipelines_own_message(cvae_app, vae_app, tmp_path):
    """0 images, a class the model does not have, an image of the wrong size: the pipeline's ValueError, word for
    word (gradio hides the message of any other exception)."""
    from gradio_client import handle_file

    pipe, url = cvae_app
    vae, vae_url = vae_app
    wrong_size = PIL.Image.new("L", (5, 5))
    wrong_size.save(tmp_path / "wrong.png")
    cases = [(url, (0, 0, "cat"), "/sample", lambda: pipe(0, class_labels="cat")),
             (url, (2, 0, "wolf"), "/sample", lambda: pipe(2, class_labels="wolf")),
             (vae_url, (handle_file(str(tmp_path / "wrong.png")), None), "/reconstruct",
              lambda: vae.reconstruct(wrong_size))]
    for app_url, args, api_name, call in cases:
        with pytest.raises(AppError) as info:
            served_client(app_url).predict(*args, api_name=api_name)
        assert str(info.value) == pipeline_error(call)


def test_vae_app_reconstructs_and_traverses(vae_app, tmp_path):
    from gradio_client import handle_file

    pipe, url = vae_app
    assert set(api(url)) == {"/sample", "/reconstruct", "/interpolate", "/traverse"}
    image = pipe(1, generator=torch.manual_seed(1)).images[0]
    image.save(tmp_path / "in.png")
    client = served_client(url)
    got = np.asarray(PIL.Image.open(local(client.predict(handle_file(str(tmp_path / "in.png")), None, api_name="/reconstruct"))))
    np.testing.assert_array_equal(got, np.asarray(pipe.reconstruct(image).images[0]))
    sweep = client.predict(2, 3.0, None, api_name="/traverse")
    expected = pipe.traverse(2, torch.linspace(-3, 3, 7).tolist()).images
    assert len(sweep) == 7
    for got, want in zip(pixels(sweep), pixels(expected)):
        np.testing.assert_array_equal(got, want)


def test_the_app_shows_the_model_cards_metrics_and_grid(tmp_path):
    folder = tmp_path / "vae"
    tiny_vae().save_pretrained(folder)
    (folder / "metrics.json").write_text(json.dumps({"fd": 12.5, "nll": 80.25}))
    PIL.Image.new("L", (16, 16), 200).save(folder / "samples.png")
    demo = build_demo(str(folder))
    by_id = {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    assert "| fd | 12.5 |" in by_id["card-metrics"].value and "| nll | 80.25 |" in by_id["card-metrics"].value
    assert by_id["card-grid"].value is not None


def test_the_edit_tab_runs_image_to_image_and_inpaints_the_painted_region(tmp_path):
    from gradio_client import handle_file

    pipe = tiny_ddpm()
    image = PIL.Image.fromarray((np.random.default_rng(0).random((8, 8)) * 255).astype(np.uint8), "L")
    image.save(tmp_path / "in.png")
    stroke = PIL.Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    stroke.paste((255, 0, 0, 255), (4, 0, 8, 8))  # the right half painted: regenerated
    stroke.save(tmp_path / "stroke.png")
    editor = {"background": handle_file(str(tmp_path / "in.png")), "layers": [], "composite": None}
    painted = {**editor, "layers": [handle_file(str(tmp_path / "stroke.png"))]}
    with served(build_demo(pipe)) as url:
        client = served_client(url)
        assert api(url)["/edit"] == ["image", "strength", "seed", "num_inference_steps", "class_labels"]
        same = client.predict(editor, 0.0, 0, 5, "1", api_name="/edit")
        redrawn = client.predict(editor, 0.5, 3, 5, "1", api_name="/edit")
        inpainted = client.predict(painted, 0.5, 3, 5, "1", api_name="/edit")
        with pytest.raises(AppError, match="upload an image to edit first"):
            client.predict(None, 0.5, 3, 5, "1", api_name="/edit")
    grey = np.asarray(image)
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(local(same)).convert("L")), grey)  # strength 0: the image
    expected = pipe(image=image.convert("RGB"), strength=0.5, class_labels=1, num_inference_steps=5,
                    generator=torch.manual_seed(3)).images[0]
    np.testing.assert_array_equal(np.asarray(PIL.Image.open(local(redrawn))), np.asarray(expected))
    kept = np.asarray(PIL.Image.open(local(inpainted)).convert("L"))
    np.testing.assert_array_equal(kept[:, :4], grey[:, :4])
    assert not np.array_equal(kept[:, 4:], grey[:, 4:])


def test_each_family_gets_its_own_tools():
    gan = hfgen.GANPipeline(hfgen.Generator(latent_dim=8, base_channels=8))
    for pipe, endpoints in ((tiny_vae(), {"sample", "reconstruct", "interpolate", "traverse"}), (tiny_cvae(), {"sample"}),
                            (gan, {"sample", "interpolate"}), (tiny_ddpm(), {"sample", "edit"})):
        assert {fn.api_name for fn in build_demo(pipe).fns.values() if fn.api_name} == endpoints


# ----- a real browser ----------------------------------------------------------------------------------------

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")


needs_chrome = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                  reason="no chromium and chromedriver on PATH (Debian: apt-get install chromium "
                                         "chromium-driver; .ci/run installs them)")


def chrome():
    """A headless Chromium driven through chromedriver (selenium)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,1000"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@needs_chrome
def test_a_browser_samples_a_class_and_shows_bad_input_as_an_error(cvae_app, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    pipe, url = cvae_app
    driver = chrome()
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 60)
        button = wait.until(lambda d: d.find_element(By.ID, "sample-button"))
        for selector, text in (("#num-images input", "4"), ("#seed input", "3"), ("#class input", "fox")):
            box = driver.find_element(By.CSS_SELECTOR, selector)
            box.clear()
            box.send_keys(text, Keys.ENTER)
        button.click()
        images = wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#samples img")) == 4
                            and d.find_elements(By.CSS_SELECTOR, "#samples img"))
        wait.until(lambda d: all(int(image.get_attribute("naturalWidth")) > 0 for image in images))
        assert {(int(image.get_attribute("naturalWidth")), int(image.get_attribute("naturalHeight")))
                for image in images} == {(28, 28)}
        shown = PIL.Image.open(io.BytesIO(urllib.request.urlopen(images[0].get_attribute("src"), timeout=30).read()))
        expected = pipe(4, class_labels="fox", generator=torch.manual_seed(3)).images[0]
        np.testing.assert_array_equal(np.asarray(shown), np.asarray(expected))  # the seed and class were used
        driver.save_screenshot(str(tmp_path / "demo.png"))

        box = driver.find_element(By.CSS_SELECTOR, "#num-images input")
        box.clear()
        box.send_keys("0", Keys.ENTER)
        button.click()
        message = pipeline_error(lambda: pipe(0, class_labels="fox"))
        wait.until(lambda d: message in d.find_element(By.TAG_NAME, "body").text)
        driver.save_screenshot(str(tmp_path / "demo-error.png"))
        assert "Traceback" not in driver.find_element(By.TAG_NAME, "body").text
    finally:
        driver.quit()
    assert (tmp_path / "demo.png").stat().st_size > 0


@needs_chrome
def test_a_browser_uploads_an_image_and_edits_it(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    pipe = tiny_ddpm()
    image = PIL.Image.fromarray((np.random.default_rng(1).random((8, 8)) * 255).astype(np.uint8), "L").convert("RGB")
    image.save(tmp_path / "digit.png")
    with served(build_demo(pipe)) as url:
        driver = chrome()
        try:
            driver.get(url)
            wait = WebDriverWait(driver, 60)
            wait.until(lambda d: d.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Edit')]")).click()
            upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#edit-image input[type=file]"))
            upload.send_keys(str(tmp_path / "digit.png"))
            box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#strength input[type=number]"))
            box.clear()
            box.send_keys("0", Keys.ENTER)
            time.sleep(1)  # the canvas takes the upload
            driver.find_element(By.ID, "edit-button").click()
            shown = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#edited img")
                               and d.find_element(By.CSS_SELECTOR, "#edited img"))
            wait.until(lambda d: int(shown.get_attribute("naturalWidth")) > 0)
            data = urllib.request.urlopen(shown.get_attribute("src"), timeout=30).read()
            driver.save_screenshot(str(tmp_path / "edit.png"))
        finally:
            driver.quit()
    edited = np.asarray(PIL.Image.open(io.BytesIO(data)).convert("L"))
    np.testing.assert_array_equal(edited, np.asarray(image.convert("L")))  # strength 0: the uploaded image itself


# ----- the Space, the push, the command ------------------------------------------------------------------------

SPACE = """
import runpy, sys
sys.modules["hfgen"] = None  # `import hfgen` fails: the Space installs only its requirements.txt
runpy.run_path(sys.argv[1], run_name="__main__")
"""


@contextlib.contextmanager
def space_running(app_file):
    """The Space's app.py launched as the Space runs it, in a Python without hfgen: yields its URL."""
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False"}
    app = subprocess.Popen([sys.executable, "-c", SPACE, app_file], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            if app.poll() is not None:
                raise AssertionError(f"app.py stopped: {app.stdout.read()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        app.kill()
        app.wait()


def test_write_space_runs_the_same_app_without_hfgen(hub_server, tmp_path):
    from huggingface_hub import SpaceCard
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pipe = tiny_cvae()
    pipe.push_to_hub("user/tiny-cvae")
    space = write_space("user/tiny-cvae", str(tmp_path / "space"))
    assert sorted(os.listdir(space)) == ["README.md", "app.py", "requirements.txt"]
    card = SpaceCard.load(os.path.join(space, "README.md"))
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py" and card.data.models == ["user/tiny-cvae"]
    requirements = [Requirement(line) for line in (tmp_path / "space" / "requirements.txt").read_text().splitlines()]
    assert {"torch", "diffusers", "huggingface-hub", "psutil"} <= {canonicalize_name(r.name) for r in requirements}
    for requirement in requirements:  # released packages, at versions that serve: those installed here
        assert "hfgen" not in requirement.name and requirement.specifier.contains(
            importlib.metadata.version(requirement.name), prereleases=True), requirement

    with space_running(os.path.join(space, "app.py")) as url:
        images, _ = served_client(url).predict(2, 4, "cat", api_name="/sample")
    for got, want in zip(pixels(images), pixels(pipe(2, class_labels="cat", generator=torch.manual_seed(4)).images)):
        np.testing.assert_array_equal(got, want)

    pipe.save_pretrained(tmp_path / "pipe")
    with pytest.raises(ValueError, match="`model_id` must be the Hub repo id"):
        write_space(str(tmp_path / "pipe"), str(tmp_path / "other"))  # a local folder needs its repo id
    with pytest.raises(ValueError, match="holds no code for plain diffusers"):
        write_space(os.path.join(os.path.dirname(__file__), "fixtures", "vae-pipeline-0.1.0"), str(tmp_path / "other"),
                    "user/old")


def test_push_demo_pushes_a_space_beside_the_model(hub_server, tmp_path):
    from hfgen.training.train_vae import main

    args = quick_training_args(tmp_path / "out", "--hidden_dims", "16", "--latent_dim", "4", "--max_train_steps", "2",
                               "--train_batch_size", "32", "--eval_num_samples", "20", "--eval_importance_samples", "1",
                               "--feature_extractor", "none", "--push_to_hub", "--hub_model_id", "user/vae")
    with pytest.raises(ValueError, match="`--push_demo` .* needs `--push_to_hub`"):
        main([arg for arg in args if arg != "--push_to_hub"] + ["--push_demo"])
    assert not (tmp_path / "out").exists()  # refused before any work
    main([*args, "--push_demo"])

    files = hub_server.files("spaces/user/vae-demo")
    assert hub_server.space_sdks["spaces/user/vae-demo"] == "gradio"
    assert "demo = space_demo('user/vae')" in files["app.py"].decode()
    assert "sdk: gradio" in files["README.md"].decode() and "user/vae" in files["README.md"].decode()
    assert "model_index.json" in hub_server.files("user/vae")
    assert hub_server.unknown_requests == []


def test_demo_command_serves_or_writes_a_space(tmp_path, monkeypatch):
    from hfgen.cli import main

    folder = tmp_path / "vae"
    tiny_vae().save_pretrained(folder)
    launched = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: launched.update(kwargs, blocks=self))
    main(["demo", str(folder), "--port", "7999", "--share"])
    assert launched["server_port"] == 7999 and launched["share"] is True and launched["server_name"] == "127.0.0.1"
    assert isinstance(launched["blocks"], gr.Blocks)

    main(["demo", str(folder), "--write_space", str(tmp_path / "space"), "--hub_model_id", "user/vae"])
    assert "demo = space_demo('user/vae')" in (tmp_path / "space" / "app.py").read_text()


def test_without_gradio_import_hfgen_works_and_the_demo_says_how_to_install_it(tmp_path):
    code = ("import sys, hfgen\n"
            "assert 'gradio' not in sys.modules, 'import hfgen imported gradio'\n"
            "sys.modules['gradio'] = None  # as if gradio were not installed\n"
            "from hfgen.cli import main\n"
            "main(['demo', sys.argv[1]])\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == 'hfgen: error: the hfgen demo needs gradio: pip install "hfgen[demo]"'
