"""Check the Qwen3 and Gemma 3 GGUF exports in a real llama.cpp: perplexity agreement, size, speed.

    python scripts/check_llamacpp_families.py                  # writes docs/edge_families.{json,md}
    python scripts/check_llamacpp_families.py --families qwen3 # one family

No Qwen3 weights ship here: its dense model is a Qwen3 config with random weights (seed 0,
``initializer_range`` 0.1 so that every layer moves the logits; perplexity agreement needs no
training) and SmolLM2's tokenizer. Gemma 3's is the embedded Gemma-3-270M, whose tokenizer llama.cpp
reads from the original GGUF (``--tokenizer-gguf``). Each dense model is pruned one-shot
(``adaptprune prune``: STADE scores on 8,192 calibration tokens, no compensation, since neither
``qwen3``/``openelm`` nor ``gemma3`` has an output-bias tensor) twice to the same size: to a uniform
``prune.target_shape``, and with ``prune.allocation=adaptive`` (per-layer sizes). Every model is
exported f32, quantized to Q4_K_M with llama-quantize, scored with llama-perplexity against our own
fp32 perplexity on llama.cpp's token ids, and benchmarked (llama-bench pp128 / tg64, OpenMP's
spinning threads, models alternating round by round); a refused export is a row with its message.
The llama.cpp helpers and tables are ``scripts/check_llamacpp.py``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import check_llamacpp as base  # noqa: E402

from adaptprune.export import ExportError, export_model_dir, llamacpp, quant_fallbacks  # noqa: E402
from adaptprune.export.llamacpp_report import fallback_table, ppl_table, sizes_table, speed_table  # noqa: E402

QWEN3 = dict(  # a Qwen3-0.6B-like layout at a tenth of the depth and half the width
    model_type="qwen3", hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=4, head_dim=64, max_position_embeddings=4096, tie_word_embeddings=True,
    initializer_range=0.1, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
)  # fmt: skip
FAMILIES = {  # name -> (uniform target shape, note)
    "qwen3": ("{layers: 8, hidden: 512, kv_groups: 2, neurons: 1024}", "random weights, SmolLM2 tokenizer"),
    "gemma3": ("{layers: 18, hidden: 640, kv_groups: 1, neurons: 1536}", "embedded Gemma-3-270M"),
}
CHEAP = ["prune.compensation=none", "data.eval_tokens=1024", "data.eval_corpora=[]"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="qwen3,gemma3")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--work", default=None, help="folder for models and GGUF files (default: cache)")
    p.add_argument("--out", default="docs/edge_families")
    return p.parse_args()


def dense_dir(family: str, work: Path) -> Path:
    """The dense model of a family: Qwen3 built from ``QWEN3`` once, Gemma 3 the embedded one."""
    from adaptprune.assets import embedded_model_dir

    if family == "gemma3":
        return embedded_model_dir("gemma3-270m")
    out = work / "qwen3-dense"
    if not (out / "config.json").exists():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from adaptprune.checkpoint import load_tokenizer

        tokenizer = load_tokenizer("smollm2-135m")
        values = dict(QWEN3)
        config = AutoConfig.for_model(values.pop("model_type"), vocab_size=len(tokenizer), **values)
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


def pruned_dir(family: str, dense: Path, work: Path, kind: str, target: int | None) -> Path:
    """``adaptprune prune`` one-shot: to the uniform shape, or adaptively to ``target`` parameters."""
    from adaptprune.config import load_config
    from adaptprune.run.oneshot import run_oneshot

    out = work / f"{family}-{kind}"
    if not (out / "model" / "config.json").exists():
        shape = FAMILIES[family][0]
        how = [f"prune.target_shape={shape}"] if kind == "uniform" else [f"prune.target_params={target}"]
        how += ["prune.allocation=uniform" if kind == "uniform" else "prune.allocation=adaptive"]
        print(f"pruning {family} ({kind}) -> {out}", flush=True)
        run_oneshot(load_config(None, [f"model.name={dense}", *CHEAP, *how]), out, progress=False)
    return out / "model"


def model_row(name: str, folder: Path, work: Path, args, tokenizer_gguf: Path | None) -> dict:
    """Export, quantize, perplexity; a refused export gives a row with the refusal."""
    from adaptprune.checkpoint import load_model
    from adaptprune.pruning.surgery import count_non_embedding_parameters, count_parameters

    model = load_model(str(folder))
    row = {"name": name, "folder": str(folder), "params": count_parameters(model)}
    row["non_embedding_params"] = count_non_embedding_parameters(model)
    del model
    stem = base.slug(name)
    try:
        report = export_model_dir(folder, work / f"{stem}-f32.gguf", "f32", None, tokenizer_gguf, ("Q4_K_M",))
    except ExportError as err:
        row["refused"] = str(err)
        print(f"{name}: refused: {err}", flush=True)
        return row
    files = {"f32": report.path, "Q4_K_M": work / f"{stem}-Q4_K_M.gguf"}
    actual = llamacpp.quantize(files["f32"], files["Q4_K_M"], "Q4_K_M", args.threads)
    row["fallbacks"] = {
        "Q4_K_M": {
            "llama_quantize": actual,
            "f16": sorted(t for t, f in actual.items() if f.upper() == "F16"),
            "predicted_match": sorted(actual) == sorted(quant_fallbacks(report.tensors, "Q4_K_M")),
        }
    }
    row |= {
        "arch": report.arch,
        "ffn": [s.neurons for s in report.sizes],
        "kv_heads": [s.kv_heads for s in report.sizes],
    }
    row["files"] = {k: str(v) for k, v in files.items()}
    row["file_mib"] = {k: v.stat().st_size / 2**20 for k, v in files.items()}
    row["non_embedding_mib"] = {k: base.non_embedding_mib(v) for k, v in files.items()}
    perplexity(row, work / "heldout.txt", args)
    return row


def perplexity(row: dict, text_file: Path, args) -> None:
    """Ours (fp32 PyTorch, llama-perplexity's protocol) and llama.cpp's, on llama.cpp's token ids."""
    from adaptprune.checkpoint import load_model, load_tokenizer

    f32 = Path(row["files"]["f32"])
    cpp_ids = llamacpp.llamacpp_tokens(f32, text_file)
    tokenizer = load_tokenizer(row["folder"])
    ours_ids = tokenizer(text_file.read_text(encoding="utf-8"))["input_ids"]
    n = args.ctx * args.chunks
    row["same_tokens"] = cpp_ids[:n] == ours_ids[:n]
    bos = tokenizer.bos_token_id if cpp_ids and cpp_ids[0] == tokenizer.bos_token_id else None
    t0 = time.time()
    model = load_model(row["folder"])
    row["ppl_ours"] = llamacpp.perplexity_like_llamacpp(model, cpp_ids, args.ctx, args.chunks, bos)
    row["ppl_ours_s"] = time.time() - t0
    row["ppl"] = {k: llamacpp.llamacpp_perplexity(Path(p), text_file, args.ctx, args.chunks, args.threads)
                  for k, p in row["files"].items()}  # fmt: skip
    row["ppl_f32_rel_diff"] = row["ppl"]["f32"] / row["ppl_ours"] - 1
    print(f"  {row['name']}: ppl ours {row['ppl_ours']:.4f}, llama.cpp {row['ppl']}", flush=True)


def family_rows(family: str, work: Path, args) -> list[dict]:
    from adaptprune.assets import embedded_gguf_file

    dense = dense_dir(family, work)
    tokenizer_gguf = embedded_gguf_file("gemma3-270m", work) if family == "gemma3" else None
    uniform = pruned_dir(family, dense, work, "uniform", None)
    target = json.loads((uniform.parent / "metrics.json").read_text())["params_after"]
    per_layer = pruned_dir(family, dense, work, "per-layer", target)
    models = [(f"{family} dense", dense), (f"{family} uniform", uniform), (f"{family} per-layer", per_layer)]
    return [model_row(name, folder, work, args, tokenizer_gguf) for name, folder in models]


def main() -> None:
    args = parse_args()
    llamacpp.build()
    from adaptprune.assets import cache_root
    from adaptprune.checkpoint import load_tokenizer

    work = Path(args.work) if args.work else cache_root() / "edge_families"
    work.mkdir(parents=True, exist_ok=True)
    text = base.heldout_text(load_tokenizer("smollm2-135m"), args.ctx * args.chunks + 1024)
    (work / "heldout.txt").write_text(text, encoding="utf-8")
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    result = {"families": {}}
    load_before = os.getloadavg()[0]
    for family in families:
        rows = family_rows(family, work, args)
        runnable = [r for r in rows if "refused" not in r]
        for kind in ("f32", "Q4_K_M"):
            files = {r["name"]: Path(r["files"][kind]) for r in runnable}
            speeds = llamacpp.alternating_bench(files, args.threads, args.rounds, args.reps)
            for r in runnable:
                r.setdefault("speed", {}).setdefault(str(args.threads), {})[kind] = speeds[r["name"]]
        result["families"][family] = {"note": FAMILIES[family][1], "rows": rows}
    settings = {k: getattr(args, k) for k in ("ctx", "chunks", "threads", "rounds", "reps")}
    settings |= {"n_prompt": 128, "n_gen": 64, "date": time.strftime("%Y-%m-%d"), "build": llamacpp.BUILD}
    settings["load_average"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
    settings["command"] = "python scripts/check_llamacpp_families.py " + " ".join(sys.argv[1:])
    result["settings"] = settings
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(result, Path(f"{args.out}.md"))
    print(f"written {args.out}.json and {args.out}.md")


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"Generated by `{s['command']}` on {s['date']}, llama.cpp build {s['build']}, {s['threads']} threads, "
        f"{s['rounds']} alternating rounds of llama-bench (pp{s['n_prompt']} / tg{s['n_gen']}, spinning OpenMP "
        f"threads). Load average {s['load_average'][0]} before and {s['load_average'][1]} after.",
        "",
    ]
    for family, data in result["families"].items():
        rows = [r for r in data["rows"] if "refused" not in r]
        lines += [f"### {family} ({data['note']})", ""]
        lines += sizes_table(rows, ["f32", "Q4_K_M"]) + [""]
        lines += ppl_table(rows, ["f32", "Q4_K_M"]) + [""]
        lines += speed_table(rows, ["f32", "Q4_K_M"], str(s["threads"])) + [""]
        lines += fallback_table(rows, ["Q4_K_M"]) + [""]
        for r in data["rows"]:
            if "refused" in r:
                lines += [f"- **{r['name']}** ({r['params']:,} parameters): export refused: {r['refused']}", ""]
    return "\n".join(lines)


def write_markdown(result: dict, md: Path) -> None:
    text = (
        md.read_text()
        if md.exists()
        else f"# GGUF export of Qwen3 and Gemma 3 in llama.cpp\n\n{base.BEGIN}\n{base.END}\n"
    )
    head, rest = text.split(base.BEGIN, 1)
    md.write_text(f"{head}{base.BEGIN}\n{markdown(result)}{base.END}{rest.split(base.END, 1)[1]}")


if __name__ == "__main__":
    main()
