"""The tables bench/gpu_throughput.py prints after its runs: speed per run (with the variant, i.e. the levers
the call set, and the ratio to the padded layout of the same call), then memory against `qwenvl-ft estimate` at
the largest batch each run saw."""


def print_tables(results: list, label: str) -> None:
    print(f"variant: {label}\n")
    print("| model | method | layout | variant | attention | s/step | samples/s | tokens/s | padding | data wait "
          "| collate s/step | peak GiB | estimate GiB | MFU | vs padded |")
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    padded = {(r["model"], r["method"]): r for r in results
              if r.get("layout") in ("padded", "dpo padded") and "error" not in r}
    for r in results:
        if "error" in r:
            print(f"| {r['model']} | {r['method']} | {r['layout']} | {label} | | failed: {r['error']} "
                  f"| | | | | | | | | |")
            continue
        base = padded.get((r["model"], r["method"]))
        ratio = f"{r['samples_s'] / base['samples_s']:.2f}x" if base else ""
        print(f"| {r['model']} | {r['method']} | {r['layout']} | {r['variant']} | {r['attn']} | "
              f"{r['s_per_step']:.3f} | "
              f"{r['samples_s']:.1f} | {r['tokens_s']:.0f} | {r['padding']:.1%} | {r['data_wait']:.1%} | "
              f"{r['collate_s']:.3f} | {r['peak_gib']:.2f} | "
              f"{r['predicted_gib']:.2f} | {r['mfu']:.1%} | {ratio} |")
    print("\nMemory against the estimate at the largest batch each run saw (rows, tokens, visual tokens, ViT patches: "
          "each the maximum over batches); held = allocated between steps, activations = peak - held\n")
    print("| model | method | layout | largest batch | held GiB | estimate | activations GiB | estimate | peak GiB "
          "| estimate |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if "error" in r or "seen_static_gib" not in r:
            continue
        print(f"| {r['model']} | {r['method']} | {r['layout']} {r['variant']} | {' x '.join(map(str, r['largest']))} | "
              f"{r['static_gib']:.2f} | {r['seen_static_gib']:.2f} | {r['peak_gib'] - r['static_gib']:.2f} | "
              f"{r['seen_activations_gib']:.2f} | {r['peak_gib']:.2f} | {r['seen_total_gib']:.2f} |")

