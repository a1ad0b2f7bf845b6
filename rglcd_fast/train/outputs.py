"""What a finished run leaves for its users: pipeline/ (a diffusers pipeline folder), lora/ (LoRA weights for
load_lora_weights), each with a model card (README.md: the base model, the settings, the sample grid, how to
load it), and the names diffusers' LCD scripts write (unet/ and unet_lora/, links to ours)."""

import json
import os
import shutil

# the settings a model card lists (all of them are in the run's config.json)
CARD_SETTINGS = (
    "teacher",
    "data",
    "resolution",
    "use_lora",
    "lora_rank",
    "reward_mode",
    "reward_model",
    "reward_scale",
    "lrm_path",
    "lrm_frozen",
    "max_train_steps",
    "train_batch_size",
    "learning_rate",
    "loss_type",
    "huber_c",
    "w_min",
    "w_max",
    "num_ddim_timesteps",
    "ema_decay",
    "mixed_precision",
    "seed",
)


def save_pipeline(folder, teacher, student, settings, grid, prompts) -> None:
    """The teacher's text encoder(s), tokenizer(s) and VAE (the run's own VAE when it had one) copied as they are,
    the UNet (the student's; the teacher's for LoRA), an LCMScheduler with the teacher's schedule,
    model_index.json and the model card. SDXL: a StableDiffusionXLPipeline folder (it runs a full student's
    guidance embedding too)."""
    import diffusers

    os.makedirs(folder)
    texts = ("text_encoder", "tokenizer") + (("text_encoder_2", "tokenizer_2") if teacher.is_sdxl else ())
    for part in texts:
        shutil.copytree(os.path.join(teacher.folder, part), os.path.join(folder, part))
    shutil.copytree(teacher.vae_folder or os.path.join(teacher.folder, "vae"), os.path.join(folder, "vae"))
    if settings["use_lora"]:
        shutil.copytree(os.path.join(teacher.folder, "unet"), os.path.join(folder, "unet"))
    else:
        student.save_pretrained(os.path.join(folder, "unet"))
    teacher.lcm_scheduler().save_pretrained(os.path.join(folder, "scheduler"))
    index = {
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "LCMScheduler"],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
    }
    if teacher.is_sdxl:
        with open(os.path.join(teacher.folder, "model_index.json")) as f:
            zeros = json.load(f).get("force_zeros_for_empty_prompt", True)
        index.update(
            _class_name="StableDiffusionXLPipeline",
            text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
            tokenizer_2=["transformers", "CLIPTokenizer"],
            force_zeros_for_empty_prompt=zeros,
        )
    else:
        index.update(
            _class_name="StableDiffusionPipeline" if settings["use_lora"] else "LatentConsistencyModelPipeline",
            safety_checker=[None, None],
            requires_safety_checker=False,
        )
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    write_model_card(folder, "pipeline", settings, grid, prompts)


def save_lora(folder, student, sdxl, settings, grid, prompts) -> None:
    """The adapters as pytorch_lora_weights.safetensors through save_lora_weights (StableDiffusionXLPipeline's for
    SDXL), and the card. Their keys stay in peft's form (lora_A / lora_B): the form the LCD-LoRA scripts convert
    them to (lora.down / lora.up, convert_state_dict_to_diffusers) loses every attention projection's adapter in
    diffusers' load_lora_weights (diffusers 0.42: 47 of 79 layers of a tiny UNet load)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    pipeline = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    pipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(student), safe_serialization=True)
    write_model_card(folder, "lora", settings, grid, prompts)


def write_model_card(folder, kind, settings, grid, prompts) -> str:
    """README.md (huggingface_hub's ModelCard: YAML metadata, then the text) and the sample grid beside it.
    settings: the run's config as a dict, with the mixed precision in effect."""
    from huggingface_hub import ModelCard, ModelCardData

    shutil.copyfile(grid, os.path.join(folder, "sample.png"))
    teacher, lora = settings["teacher"], settings["use_lora"]
    base = (
        "the digits world's teacher (rglcd_fast's embedded default)"
        if teacher == "digits"
        else f"`{os.path.basename(os.path.normpath(teacher))}` ({teacher})"
    )
    method = (
        "plain latent consistency distillation (LCD)"
        if settings["reward_mode"] == "none"
        else f"reward-guided LCD (RG-LCD), reward mode `{settings['reward_mode']}`, expert `{settings['reward_model']}`"
    )
    student = (
        f"An LCM-LoRA (rank {settings['lora_rank']}) of the teacher"
        if lora
        else "A latent consistency model (the teacher's UNet with a guidance embedding)"
    )
    here = os.path.join(settings["output_dir"], kind)
    if lora:  # the adapters go on the teacher's UNet: the run's pipeline folder holds it, so does the teacher
        model, literal = (here, f'"{here}"') if kind == "pipeline" else ("BASE_MODEL", "BASE_MODEL")
        adapters = os.path.join(settings["output_dir"], "lora")
        usage = (
            f"pipe = DiffusionPipeline.from_pretrained({literal})\n"
            "pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)\n"
            f'pipe.load_lora_weights("{adapters}")\n'
            "image = pipe(PROMPT, num_inference_steps=4, guidance_scale=1.0).images[0]"
        )
        command = f"rglcd-fast sample --model {model} --lora {adapters}"
    else:
        usage = (
            f'pipe = DiffusionPipeline.from_pretrained("{here}")\n'
            "image = pipe(PROMPT, num_inference_steps=4, guidance_scale=8.0).images[0]"
        )
        command = f"rglcd-fast sample --model {here}"
    table = "\n".join(f"| {name} | {settings[name]} |" for name in CARD_SETTINGS)
    rows = ", ".join(str(n) for n in settings["validation_lcm_steps"])
    data = ModelCardData(
        library_name="diffusers",
        license="other",
        pipeline_tag="text-to-image",
        tags=["latent-consistency-model", "rg-lcd", "rglcd_fast", "lora" if lora else "lcm"],
    )
    text = f"""---
{data.to_yaml()}
---

# {"LCM-LoRA" if lora else "LCM"} distilled with rglcd_fast

{student}, distilled from {base} by {method}, with rglcd_fast's `rglcd-fast train`
({settings["max_train_steps"]} steps).

![samples](sample.png)

Samples of the final student: one column per prompt ({"; ".join(f'"{p}"' for p in prompts)}), one row per
LCM step count ({rows}), seed {settings["seed"]}.

## Use

```python
from diffusers import DiffusionPipeline, LCMScheduler

{usage}
```

or `{command} --prompt PROMPT --steps 4`.

## Training settings

| setting | value |
|---|---|
{table}

Every setting is in the run's `config.json`.
"""
    ModelCard(text).save(os.path.join(folder, "README.md"))
    return os.path.join(folder, "README.md")


def link_script_layout(output_dir, use_lora) -> None:
    """The names diffusers' LCD scripts write, as relative links to ours: unet/ (the student's UNet) for a
    full student, unet_lora/ (pytorch_lora_weights.safetensors) for LoRA."""
    name, target = ("unet_lora", "lora") if use_lora else ("unet", os.path.join("pipeline", "unet"))
    link = os.path.join(output_dir, name)
    if os.path.islink(link) or os.path.isfile(link):
        os.remove(link)
    elif os.path.isdir(link):
        shutil.rmtree(link)
    os.symlink(target, link, target_is_directory=True)
