"""The fast sampler and `rglcd-fast sample` on tiny random pipelines (no downloads)."""

import os
import re
import shutil

import numpy as np
import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionPipeline
from helpers import CUDA_GRAPHS, no_tf32
from PIL import Image
from tiny_pipeline import assert_sdxl_sampler_matches_pipeline, save_tiny_lcm_lora, save_tiny_pipeline

from rglcd_fast.cli import main
from rglcd_fast.sample import LCMSampler
from rglcd_fast.schedulers import FusedLCMScheduler


def level_difference(image, other) -> int:
    """The largest difference of two 8-bit images (PIL or arrays), in levels."""
    return int(np.abs(np.asarray(image).astype(int) - np.asarray(other).astype(int)).max())


@pytest.fixture(scope="module")
def lcm_folder(tmp_path_factory):
    return save_tiny_pipeline(str(tmp_path_factory.mktemp("lcm")), lcm=True)


@pytest.fixture(scope="module")
def base_and_lora(tmp_path_factory):
    base = save_tiny_pipeline(str(tmp_path_factory.mktemp("base")), lcm=False)
    return base, save_tiny_lcm_lora(base, str(tmp_path_factory.mktemp("lora")))


def test_sampler_matches_the_diffusers_lcm_pipeline(lcm_folder):
    sampler = LCMSampler.from_pretrained(lcm_folder, device="cpu")
    ours = sampler.latents(["a digit seven", "a digit one"], steps=4, guidance_scale=8.0, seed=3)
    pipe = LatentConsistencyModelPipeline.from_pretrained(lcm_folder, safety_checker=None, feature_extractor=None)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(3)
    theirs = pipe(
        ["a digit seven", "a digit one"],
        num_inference_steps=4,
        guidance_scale=8.0,
        generator=generator,
        output_type="latent",
    ).images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    images = sampler(["a digit seven"], steps=2, seed=0)
    assert len(images) == 1 and isinstance(images[0], Image.Image) and images[0].size == (16, 16)
    # the images' bytes as the pipeline's image processor rounds them
    generator = torch.Generator().manual_seed(0)
    theirs = pipe(["a digit seven"], num_inference_steps=2, guidance_scale=8.0, generator=generator, output_type="np")
    expected = (theirs.images[0] * 255).round().astype(np.uint8)
    assert level_difference(images[0], expected) <= 1  # within the 1e-5 latent tolerance


def test_lcm_lora_in_stable_diffusion_pipeline_and_sampler(base_and_lora):
    base, lora = base_and_lora
    pipe = StableDiffusionPipeline.from_pretrained(
        base, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    kw = dict(num_inference_steps=3, guidance_scale=1.0, output_type="latent")
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    without_lora = pipe("a digit two", generator=torch.Generator().manual_seed(1), **kw).images
    pipe.load_lora_weights(lora)
    expected = pipe("a digit two", generator=torch.Generator().manual_seed(1), **kw).images
    assert (expected - without_lora).abs().max() > 1e-3  # the adapters (all attention projections) loaded
    pipe.scheduler = FusedLCMScheduler.from_config(pipe.scheduler.config)
    actual = pipe("a digit two", generator=torch.Generator().manual_seed(1), **kw).images
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    # the sampler fuses the same LoRA into the base UNet and samples without guidance, as the pipeline at w = 1
    sampler = LCMSampler.from_pretrained(base, lora=lora, device="cpu")
    torch.testing.assert_close(sampler.latents("a digit two", steps=3, seed=1), expected, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def xl_folders(tmp_path_factory):
    lcm = save_tiny_pipeline(str(tmp_path_factory.mktemp("xl_lcm")), lcm=True, xl=True)
    base = save_tiny_pipeline(str(tmp_path_factory.mktemp("xl_base")), lcm=False, xl=True)
    return lcm, base, save_tiny_lcm_lora(base, str(tmp_path_factory.mktemp("xl_lora")), xl=True)


def test_sdxl_sampler_matches_the_diffusers_sdxl_pipeline(xl_folders):
    """An SDXL LCM (guidance embedding) and an SDXL base model with LCM-LoRA, against diffusers'
    StableDiffusionXLPipeline with LCMScheduler (no classifier-free guidance, as LCMs sample)."""
    lcm, base, lora = xl_folders
    for folder, lora_weights, guidance in ((lcm, None, 8.0), (base, lora, 1.0)):
        sampler = assert_sdxl_sampler_matches_pipeline(folder, lora_weights, guidance, height=24, width=32)
    images = sampler(["a digit seven"], steps=2, seed=0)
    assert len(images) == 1 and images[0].size == (16, 16)


def test_sdxl_folder_errors(xl_folders, lcm_folder, tmp_path):
    broken = tmp_path / "no_tokenizer_2"
    shutil.copytree(xl_folders[0], broken)
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(ValueError, match="tokenizer_2"):
        LCMSampler.from_pretrained(str(broken), device="cpu")
    mixed = tmp_path / "sd_unet_in_sdxl_folder"
    shutil.copytree(xl_folders[0], mixed)
    shutil.rmtree(mixed / "unet")
    shutil.copytree(os.path.join(lcm_folder, "unet"), mixed / "unet")
    with pytest.raises(ValueError, match="text_encoder_2"):
        LCMSampler.from_pretrained(str(mixed), device="cpu")


def test_sampler_errors(lcm_folder, base_and_lora, tmp_path):
    with pytest.raises(FileNotFoundError, match="model"):
        LCMSampler.from_pretrained(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="missing unet"):
        LCMSampler.from_pretrained(str(tmp_path))
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):  # the parts, each empty
        os.makedirs(tmp_path / "partial" / part)
    with pytest.raises(ValueError, match="missing unet/config.json, .*scheduler_config.json, the tokenizer's files"):
        LCMSampler.from_pretrained(str(tmp_path / "partial"))
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        LCMSampler.from_pretrained(base_and_lora[0], device="cpu")
    with pytest.raises(FileNotFoundError, match="lora"):
        LCMSampler.from_pretrained(base_and_lora[0], lora=str(tmp_path / "nope"), device="cpu")
    # files that hold no LoRA weights: diffusers would fuse nothing and sample the base model
    unet_file = os.path.join(base_and_lora[0], "unet", "diffusion_pytorch_model.safetensors")
    for not_lora, line in [(unet_file, "no lora keys"), (str(tmp_path), "no LoRA weights diffusers can read")]:
        with pytest.raises(ValueError, match=f"lora: .*{line}"):
            LCMSampler.from_pretrained(base_and_lora[0], lora=not_lora, device="cpu")
    for device, line in [("gpu", "not a device torch knows"), ("cuda:1", "no CUDA device")]:
        if device.startswith("cuda") and torch.cuda.is_available():
            continue
        with pytest.raises(ValueError, match=f"device: .*{line}"):
            LCMSampler.from_pretrained(lcm_folder, device=device)
    sampler = LCMSampler.from_pretrained(lcm_folder, device="cpu")
    for kwargs, name in [
        (dict(steps=0), "steps"),
        (dict(steps=9), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(steps=True), "steps"),
        (dict(height=13), "height"),
        (dict(height=0), "height"),  # not the model's size
        (dict(width=-8), "width"),
        (dict(width=16.0), "width"),
        (dict(guidance_scale=float("nan")), "guidance_scale: expected a finite"),
        (dict(guidance_scale=float("inf")), "guidance_scale: expected a finite"),
        (dict(guidance_scale="8"), "guidance_scale: expected a number"),
        (dict(cuda_graph=True), "cuda_graph"),
    ]:
        with pytest.raises(ValueError, match=name):
            sampler.latents("a digit", **kwargs)
    with pytest.raises(ValueError, match="prompts"):
        sampler.latents([])


def test_cli_sample_writes_a_grid(lcm_folder, tmp_path, capsys):
    out = str(tmp_path / "grid.png")
    code = main(
        [
            "sample",
            "--model",
            lcm_folder,
            "--prompt",
            "a digit seven",
            "--prompt",
            "a digit one",
            "--num-images",
            "2",
            "--steps",
            "2",
            "--seed",
            "0",
            "--out",
            out,
            "--quiet",
        ]
    )
    assert code == 0 and os.path.exists(out)
    assert Image.open(out).size == (32, 32)  # 2 prompts (rows) x 2 images (columns) of 16 px
    assert "wrote" in capsys.readouterr().out
    assert main(["sample", "--model", str(tmp_path / "missing"), "--prompt", "x", "--out", out]) == 2
    assert "model: no such folder" in capsys.readouterr().err
    # a grid that could not be written is named before any model is loaded or sampled
    for bad, line in [
        (str(tmp_path / "grid"), "--out: .* no image extension"),
        (str(tmp_path / "no" / "grid.png"), "--out: the folder .* does not exist"),
        (str(tmp_path / "folder.png"), "--out: .* is a folder"),
    ]:
        os.makedirs(tmp_path / "folder.png", exist_ok=True)
        assert main(["sample", "--model", str(tmp_path / "missing"), "--prompt", "x", "--out", bad]) == 2
        assert re.search(line, capsys.readouterr().err)
    with pytest.raises(SystemExit):  # argparse's error, naming the flag
        main(["sample", "--model", lcm_folder, "--prompt", "x", "--num-images", "0", "--out", out])
    assert "argument --num-images: expected a positive integer" in capsys.readouterr().err


def test_a_sampling_run_repeats(lcm_folder):
    """The function a CUDA graph captures runs twice (the warm-up, then the capture): each run starts the schedule
    from its first step (FusedLCMScheduler.restart), so a second run equals the first. (Without it the second
    run stepped on from the end of the schedule and the captured latents were off by ~45.)"""
    sampler = LCMSampler.from_pretrained(lcm_folder, device="cpu")
    generator = torch.Generator()
    run, _ = sampler._sampling_run(sampler.token_ids(["a digit seven"]), 16, 16, 4, 8.0, generator, decode=False)
    with torch.no_grad():
        (first,) = run()
        generator.manual_seed(generator.initial_seed())
        torch.testing.assert_close(run()[0], first, rtol=0, atol=0)
    torch.testing.assert_close(sampler.latents("a digit seven", steps=4, seed=generator.initial_seed()), first)


def test_images_that_decode_to_nan_are_refused_not_returned_black(lcm_folder):
    sampler = LCMSampler.from_pretrained(lcm_folder, device="cpu")
    with torch.no_grad():
        sampler.vae.decoder.conv_out.bias[0] = float("nan")
    with pytest.raises(ValueError, match=r"images \[0, 1\] decoded to non-finite values"):
        sampler(["a digit one", "a digit two"], steps=1)
    assert sampler.latents("a digit one", steps=1).isfinite().all()  # the latents are fine: the decode is not


@pytest.mark.skipif(not CUDA_GRAPHS, reason="CUDA graphs need CUDA and its caching allocator")
@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_cuda_graph_equals_eager(lcm_folder, xl_folders, xl):
    sampler = LCMSampler.from_pretrained(xl_folders[0] if xl else lcm_folder, device="cuda", dtype=torch.float32)
    for seed in (0, 5):  # the second replay re-seeds the graph's noise
        eager = sampler.latents(["a digit seven", "a digit one"], steps=4, seed=seed)
        graphed = sampler.latents(["a digit seven", "a digit one"], steps=4, seed=seed, cuda_graph=True)
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
    assert len(sampler._graphs) == 1


def test_compiled_sampler_equals_eager(lcm_folder):
    """compile() (torch.compile of the UNet and the VAE decoder) samples what the eager modules sample."""
    sampler = LCMSampler.from_pretrained(lcm_folder, device="cpu")
    prompts = ["a digit seven", "a digit one"]
    eager = sampler.latents(prompts, steps=2, seed=4)
    eager_images = sampler(prompts, steps=2, seed=4)
    with pytest.raises(ValueError, match="mode"):
        sampler.compile(mode="reduce-overhead")  # its own CUDA graphs would nest in the sampler's
    sampler.compile()
    torch.testing.assert_close(sampler.latents(prompts, steps=2, seed=4), eager, rtol=1e-4, atol=1e-4)
    for ours, theirs in zip(sampler(prompts, steps=2, seed=4), eager_images):
        assert level_difference(ours, theirs) <= 1


@pytest.mark.skipif(not CUDA_GRAPHS, reason="CUDA graphs need CUDA and its caching allocator")
@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_compiled_cuda_graph_sampling_equals_eager(lcm_folder, xl_folders, xl):
    """Compiled modules captured with the whole run (text encoders to the images' bytes) sample what the eager
    run samples: compiled = eager within the compiled tolerance, and the graph's replay = the compiled modules
    run eagerly. Without TF32: cuDNN's default TF32 convolutions pick other algorithms in compiled code, and
    their rounding, not the compilation, would set the difference (1.6e-4 of the latents' range, measured)."""
    sampler = LCMSampler.from_pretrained(xl_folders[0] if xl else lcm_folder, device="cuda", dtype=torch.float32)
    prompts = ["a digit seven", "a digit one"]
    with no_tf32():
        eager = {seed: (sampler.latents(prompts, seed=seed), sampler(prompts, seed=seed)) for seed in (0, 5)}
        sampler.compile()
        for seed, (latents, images) in eager.items():
            compiled = sampler.latents(prompts, seed=seed)
            torch.testing.assert_close(
                sampler.latents(prompts, seed=seed, cuda_graph=True), compiled, rtol=1e-5, atol=1e-5
            )
            torch.testing.assert_close(compiled, latents, rtol=1e-4, atol=1e-4)
            for ours, theirs in zip(sampler(prompts, seed=seed, cuda_graph=True), images):
                assert level_difference(ours, theirs) <= 1
    assert len(sampler._graphs) == 2  # one for the latents, one for the images
