"""bench_train_step.py's report: the markdown results table."""

import datetime
import os
import statistics

import torch
from report import commit_id
from train_step_models import HUBER_C

PROVIDER_NAMES = {
    "reference": "A. reference (LCD script step, incl. text + VAE encode)",
    "reference_noencode": "A'. reference, latents + embeddings pre-encoded (anchor scope)",
    "rglcd_fast": "B. rglcd_fast Trainer.train_step (defaults)",
    "rglcd_fast_cl": "B, channels_last=True",
    "rglcd_fast_bf16_target": "B, EMA target stored in bf16 (not adopted)",
    "rglcd_fast_nockpt": "B, gradient_checkpointing=False",
    "rglcd_fast_decode_one_call": "B, vae_decode_batch_size=3·batch (one decode call)",
    "rglcd_fast_compile": "B, compile_unets=all",
    "rglcd_fast_compile_cl": "B, compile_unets=all, channels_last=True",
    "rglcd_fast_compile_frozen": "B, compile_unets=frozen",
    "rglcd_fast_compile_blocks": "B, compile_unets=student_blocks",
    "rglcd_fast_compile_blocks_decode_one_call": "B, compile_unets=student_blocks, one decode call",
    "rglcd_fast_compile_blocks_cl": "B, compile_unets=student_blocks, channels_last=True",
    "rglcd_fast_compile_blocks_lrm": "B, compile_unets=student_blocks, the LRM's towers compiled",
    "rglcd_fast_compile_budget": "B, compile_unets=all, compile_memory_budget=0.5",
    "rglcd_fast_fsdp": "B, fsdp (student and target sharded, teacher replicated)",
    "rglcd_fast_fsdp_shard_teacher": "B, fsdp, teacher sharded too",
}


class Report:
    def __init__(self, path, args, device):
        self.path, self.args, self.device = path, args, device
        self.rows, self.breakdowns, self.checks, self.notes = [], [], [], []
        self.commit = commit_id()
        self.card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke run)"

    def row(self, provider, reward, times, peak_gib, base_ms, first_s, first_loss, pipelined):
        ms = statistics.median(times)
        speedup = (
            "1.00×"
            if provider == "reference"
            else f"{base_ms / ms:.2f}×"
            if base_ms and provider != "reference_noencode"
            else "–"
        )
        self.rows.append(
            dict(
                name=PROVIDER_NAMES[provider],
                reward=reward,
                ms=ms,
                lo=min(times),
                hi=max(times),
                n=len(times),
                ips=self.args.batch / ms * 1e3,
                peak=peak_gib,
                speedup=speedup,
                first_s=first_s,
                loss=first_loss,
                pipelined=pipelined,
            )
        )
        self.write()
        return ms

    def write(self):
        a = self.args
        scale = "tiny configs (smoke run)" if a.small else "SD2.1 architecture (random weights)"
        lines = [
            f"# Training-step benchmark: {self.card}",
            "",
            f"torch {torch.__version__}; commit {self.commit}; {datetime.date.today().isoformat()}. {scale}, "
            f"{a.resolution} px, batch {a.batch}, bf16 mixed precision (student float32 master weights under "
            f"autocast; teacher UNet, VAE, text encoder and expert in bf16), gradient checkpointing unless "
            f"the row says otherwise, {a.prediction_type}, Huber c = {HUBER_C}. ms/step: median wall time of "
            f"n steps after the warm-up steps ({a.warmup} for A and B, {a.variant_warmup} for B's variants), "
            f"each timed from a synchronised device to a synchronised device (min–max in brackets). "
            f"Back-to-back: the mean of {a.back_to_back} steps issued with no synchronisation between them "
            f"(A and B only). First step: wall time of the first step (includes torch.compile's compilation) "
            f"and its loss (every provider starts from the same weights, data order and draws). Peak: "
            f"torch.cuda.max_memory_allocated from the provider's construction on (the frozen teacher parts, "
            f"and with the reward on the expert, are shared by the providers and included). Speedup: against "
            f"A with the same reward branch.",
            "",
            "| provider | reward branch | ms/step (n) | back-to-back ms/step | images/s | peak GiB | speedup vs A "
            "| first step s | first-step loss |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            pipelined = "–" if r["pipelined"] is None else f"{r['pipelined']:.1f}"
            peak = "–" if r["peak"] is None else f"{r['peak']:.1f}"
            lines.append(
                f"| {r['name']} | {r['reward']} | {r['ms']:.1f} ({r['lo']:.1f}–{r['hi']:.1f}, n={r['n']}) | "
                f"{pipelined} | {r['ips']:.2f} | {peak} | {r['speedup']} | {r['first_s']:.1f} | "
                f"{r['loss']:.6g} |"
            )
        for title, phases in self.breakdowns:
            total = sum(ms for _, ms in phases)
            lines += [
                "",
                f"Per-phase breakdown, {title} (median of {a.phase_steps} extra steps; GPU time between "
                f"marks, sum {total:.1f} ms):",
                "",
                "| phase | ms |",
                "|---|---|",
            ]
            lines += [f"| {label} | {ms:.1f} |" for label, ms in phases]
        if self.checks:
            lines += ["", "Loss check:", ""] + [f"- {c}" for c in self.checks]
        if self.notes:
            lines += ["", "Notes:", ""] + [f"- {n}" for n in self.notes]
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "w") as f:
            f.write("\n".join(lines) + "\n")
