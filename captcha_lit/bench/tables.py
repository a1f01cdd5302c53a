"""Markdown tables: every figure of one ``make bench`` run (its table.md), and the README's
"Current results" table from a results CSV (``--table``)."""

from __future__ import annotations

from captcha_lit.bench.training import TRAINING, VAL_MINUTES


def _shown(value, digits: int = 4) -> str:
    return "n/a" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


# ---- one run's table: benchmark | figure | value | target -----------------------------------
def _generation_lines(generation: dict) -> list[str]:
    return [f"| data generation ({generation['images']} img, median of {generation['repeats']}) | 1 core | "
            f"{generation['single_core_img_s']} img/s | |",
            f"| | {generation['workers']} cores | {generation['all_cores_img_s']} img/s | |",
            f"| | speedup | {generation['speedup']}x | >= 1.8x |"]


def _cache_load_lines(load: dict) -> list[str]:
    return [f"| cached dataset load ({load['images']} img, median of {load['repeats']}) | time | "
            f"{load['load_s']} s | <= 5 s |"]


def _throughput_lines(throughput: dict) -> list[str]:
    lines = []
    for label, model in throughput.items():
        precision = model.get("precision", "32-true")
        lines.append(f"| throughput {label} (input {model['input_size']}, {model['params']} params) | train, batch 64, "
                     f"{precision} | {model['train_img_s']} img/s | |")
        if precision != "32-true" and "train_fp32_img_s" in model:
            lines.append(f"| | train, batch 64, 32-true (baseline) | {model['train_fp32_img_s']} img/s | |")
        lines.append(f"| | inference, batch 256 | {model['infer_img_s_b256']} img/s | |")
    return lines


def _onnx_lines(onnx: dict) -> list[str]:
    lines = [f"| ONNX Runtime, default model ({onnx['arch']}, input {onnx['input_size']}, {onnx['threads']} threads, "
             f"median of {onnx['repeats']}) | inference + decoding, batch 256 | {onnx['onnx_img_s_b256']} img/s | |",
             f"| | PyTorch baseline, batch 256 | {onnx['torch_img_s_b256']} img/s | |",
             f"| | Solver.solve on PNG bytes, p50 / p99 | {onnx['solve_p50_ms']} / {onnx['solve_p99_ms']} ms | |"]
    for name, setup in (onnx.get("http") or {}).items():
        if "error" in setup:
            lines.append(f"| HTTP {name} | load test | FAILED: {setup['error']} | |")
            continue
        target = "p50 <= 20, p99 <= 100 ms" if name == "default" else ""
        lines += [f"| HTTP POST /v1/solve, {name} ({' '.join(setup['server_options']) or 'as shipped'}; "
                  f"{setup['clients']} clients, {setup['seconds']:g} s, median of {setup['repeats']}) | "
                  f"latency p50 / p99 | {setup['p50_ms']:.1f} / {setup['p99_ms']:.1f} ms | {target} |",
                  f"| | throughput | {setup['req_s']:.0f} req/s ({setup['requests']} requests, "
                  f"{setup['errors']} errors) | |",
                  f"| | server RSS before / after | {setup['server_rss_before_mb']} / "
                  f"{setup['server_rss_after_mb']} MB | |"]
    return lines


def _ddp_lines(ddp: dict) -> list[str]:
    one, two = ddp["one_process"], ddp["two_processes"]
    return [f"| DDP on CPU, default model, {ddp['num_train']} samples x {ddp['epochs']} epochs (median of "
            f"{ddp['repeats']}) | test seq acc, 1 process / 2 processes (gloo) | {_shown(one['median_test_seq_acc'])} / "
            f"{_shown(two['median_test_seq_acc'])} (difference {_shown(ddp['seq_acc_difference'])}) | same accuracy |",
            f"| | wall time, 1 / 2 processes | {one['median_wall_s']} / {two['median_wall_s']} s | |",
            f"| | train throughput, 1 / 2 processes | {one['median_train_img_s']} / "
            f"{two['median_train_img_s']} img/s | |"]


def _stream_lines(stream: dict) -> list[str]:
    lines = []
    for name in (key for key in stream if isinstance(stream[key], dict)):
        wait = stream[name]["median_wait_fraction"]
        target = "<= 10% (trainer >= 90% busy)" if name.startswith("streaming") else ""
        lines.append(f"| data wait, default model, {stream['batches']} batches of {stream['batch_size']}, "
                     f"{name.replace('_', ' ')} (median of {stream['repeats']}) | time waiting for data / img/s | "
                     f"{'n/a' if wait is None else f'{wait:.1%}'} / {stream[name]['median_img_s']} | {target} |")
    return lines


def _training_lines(key: str, summary: dict, target: str) -> list[str]:
    seeds = [str(run["seed"]) for run in summary["runs"] if "error" not in run]
    spread = summary.get("test_seq_acc_range")
    spread = (f" (seeds {', '.join(seeds)}: {_shown(spread[0])} to {_shown(spread[1])})"
              if len(seeds) > 1 and spread else "")
    lines = [f"| {key} ({' '.join(summary['overrides']) or 'no overrides'}; median of {len(seeds)}) | test seq acc | "
             f"{_shown(summary['median_test_seq_acc'])}{spread} | {target} |",
             f"| | wall time (incl. data generation) | {summary['median_wall_s']} s | |",
             f"| | peak memory of the process tree, RSS / PSS | {summary['median_peak_rss_gb']} / "
             f"{summary.get('median_peak_pss_gb', 'n/a')} GB | |",
             f"| | val seq acc at {' / '.join(map(str, VAL_MINUTES))} min | "
             f"{' / '.join(_shown(summary.get(f'median_val_seq_acc_at_{m}min')) for m in VAL_MINUTES)} | |",
             f"| | train throughput | {summary['median_train_img_s']} img/s | |"]
    lines += [f"| | {run['name']} | FAILED: {run['error']} | |" for run in summary["runs"] if "error" in run]
    return lines


def _labels_lines(result: dict) -> list[str]:
    if "error" in result:
        return [f"| few labels | | FAILED: {result['error']} | |"]
    lines = [f"| few labels of {result['dataset']} (folder recipe, median of {result['repeats']}) | pre-training "
             f"on the scheme, once per seed | {result['median_pretrain_s']} s | |"]
    for name, setup in result.items():
        if isinstance(setup, dict) and "runs" in setup:
            lines.append(f"| | {name.replace('_', ' ')} | test seq acc {_shown(setup['median_test_seq_acc'])}, "
                         f"{setup['median_wall_s']} s | |")
    return lines


def _audit_lines(audit: dict) -> list[str]:
    if "error" in audit:
        return [f"| audit of {audit.get('dataset')} | | FAILED: {audit['error']} | |"]
    return [f"| audit of {audit['dataset']}, default grid ({audit['points']} runs), fresh cache | wall time | "
            f"{audit['wall_s'] / 60:.1f} min | <= 30 min |",
            f"| | peak memory, RSS / PSS | {audit['peak_rss_gb']} / {audit['peak_pss_gb']} GB | |",
            f"| | fewest labels read at >= {audit['target']} | {audit['fewest_labels']} "
            f"({_shown(audit['fewest_labels_seq_acc'])}); all labels {_shown(audit['all_labels_seq_acc'])} | |"]


def _int8_lines(int8: dict) -> list[str]:
    if "error" in int8:
        return [f"| int8 ONNX | | FAILED: {int8['error']} | |"]
    return [f"| int8 ONNX at batch 256 | throughput int8 / fp32 | {int8['int8_img_s']} / {int8['fp32_img_s']} img/s "
            f"({int8['speedup']}x) | >= 2x |",
            f"| | texts agree with fp32 on the test split | {int8['text_agreement']:.2%} ({int8['text_mismatches']} "
            f"differ) | >= 99.9% |"]


def _parity_lines(parity: dict) -> list[str]:
    if "error" in parity:
        return [f"| ONNX parity | | FAILED: {parity['error']} | |"]
    return [f"| ONNX parity on the test split ({parity['num_images']} images) | decoded texts agree | "
            f"{parity['text_agreement']:.2%} ({parity['text_mismatches']} differ) | >= 99.9% |",
            f"| | largest logit difference | {parity['max_abs_logit_diff']:.2e} | |",
            f"| | seq acc PyTorch / ONNX | {_shown(parity['torch_seq_acc'])} / {_shown(parity['onnx_seq_acc'])} | |"]


def _hostile_lines(result: dict) -> list[str]:
    if "error" in result:
        return [f"| HTTP under attack | | FAILED: {result['error']} | |"]
    slow, attack = result["slow"], result["attack"]
    return [f"| HTTP under attack ({result['clients']} clients + {result['attackers']} attackers, {result['seconds']} s) "
            f"| legitimate /v1/solve p50 / p99 | {result['p50_ms']} / {result['p99_ms']} ms | p99 <= 200 ms |",
            f"| | legitimate errors | {result['errors']} of {result['requests']} | 0 |",
            f"| | amplification batches answered | {attack['requests']} ({attack['statuses']}) | |",
            f"| | server RSS growth | {result['rss_growth_pct']}% | <= 10% |",
            f"| | {slow['connections']} slow connections: closed, slowest | {slow['closed']}, {slow['max_close_s']} s "
            f"| <= {slow['header_timeout_s']} s |"]


_RUN_SECTIONS = {"gen": _generation_lines, "load": _cache_load_lines, "throughput": _throughput_lines,
                 "onnx": _onnx_lines, "hostile_load": _hostile_lines, "ddp": _ddp_lines, "stream": _stream_lines}


def run_table(results: dict) -> str:
    """Every figure of one run's ``results`` (keyed by ``--only`` name), with its target."""
    lines = ["| benchmark | figure | value | target |", "|---|---|---|---|"]
    for key, section in _RUN_SECTIONS.items():
        if key in results:
            lines += section(results[key])
    for key, recipe in TRAINING.items():
        if key in results:
            lines += _training_lines(key, results[key], recipe.target)
    if "labels" in results:
        lines += _labels_lines(results["labels"])
    if "audit" in results:
        lines += _audit_lines(results["audit"])
    if "parity" in results:
        lines += _parity_lines(results["parity"])
    if "int8" in results:
        lines += _int8_lines(results["int8"])
    return "\n".join(lines) + "\n"


# ---- the README's current results: benchmark | figure | date | command ----------------------
def _figure_text(value: str) -> str:
    """A value as the CSV has it ("0.000" stays), float noise beyond 4 decimals rounded away."""
    _, dot, decimals = value.partition(".")
    if dot and len(decimals) > 4 and decimals.isdigit():
        return f"{float(value):.4f}"
    return value


def _training_figure(values: dict) -> str:
    figure = f"test seq acc {values['test_seq_acc']}, wall {values['wall_time_s']} s"
    if "peak_pss_gb" in values:  # PSS counts the pages that forked workers share with the trainer once
        return figure + f", peak PSS {values['peak_pss_gb']} GB (summed RSS {values['peak_rss_gb']})"
    return figure + (f", peak RSS {values['peak_rss_gb']} GB" if "peak_rss_gb" in values else "")


def _labels_figure(benchmark: str, values: dict) -> str:
    labels = benchmark.split("_")[-2 if benchmark.endswith("_unlabeled") else -1]
    if benchmark.endswith("_unlabeled"):
        return (f"{labels} labels and the rest of the training split unlabeled: test seq acc {values['test_seq_acc']} "
                f"({values['test_seq_acc_labels_only']} with the labels alone), {values['wall_time_s']} s")
    return (f"{labels} labels: test seq acc {values['test_seq_acc']} pre-trained ({values['test_seq_acc_scratch']} "
            f"from scratch), ECE {values['test_ece']}, {values['wall_time_s']} s (+{values['pretrain_s']} s "
            "pre-training, once per scheme)")


def _throughput_figure(values: dict) -> str:
    labels = ["default"] + [metric.removesuffix("_train_img_s_fp32") for metric in values
                            if metric.endswith("_train_img_s_fp32")]
    parts = []
    for label in labels:
        prefix = "" if label == "default" else f"{label}_"
        fp32, infer = values[f"{prefix}train_img_s_fp32"], values[f"{prefix}infer_img_s"]
        bf16 = values.get(f"{prefix}train_img_s_bf16")
        if label == "default":
            train = f"train {bf16} img/s bf16, {fp32} fp32" if bf16 else f"train {fp32} img/s fp32"
            parts.append(f"default: {train}, inference {infer} img/s")
        else:
            parts.append(f"{label}: {bf16 + ', ' if bf16 else ''}{fp32}, {infer}")
    return "; ".join(parts)


def _onnx_figure(values: dict) -> str:
    return (f"ONNX Runtime {values['infer_img_s']} img/s at batch 256; `Solver.solve` p50 {values['solve_p50_ms']} ms, "
            f"p99 {values['solve_p99_ms']} ms")


def _http_figure(values: dict) -> str:
    return f"`/v1/solve`: p50 {values['p50_ms']} ms, p99 {values['p99_ms']} ms, {values['req_s']} req/s"


def _ddp_figure(values: dict) -> str:
    return (f"2 gloo processes: test seq acc {values['test_seq_acc']}, {values['wall_time_s']} s; "
            f"1 process: {values['test_seq_acc_1proc']}, {values['wall_time_s_1proc']} s")


def _stream_figure(values: dict) -> str:
    return (f"streamed: {values['data_wait_pct']}% of the time waiting for data, {values['train_img_s']} img/s; "
            f"cached split: {values['data_wait_pct_cached']}%, {values['train_img_s_cached']} img/s")


def _generation_figure(values: dict) -> str:
    return (f"1 core {values['single_core_img_s']} img/s, all cores {values['all_cores_img_s']} img/s "
            f"({values['speedup']}x)")


def _cache_load_figure(values: dict) -> str:
    return f"cached split loaded in {values['load_s']} s"


def _audit_figure(values: dict) -> str:
    minutes = float(values["wall_time_s"]) / 60
    return (f"default grid ({values['points']} runs) in {minutes:.1f} min from a fresh cache; "
            f"{values['fewest_labels']} labels read {values['fewest_labels_seq_acc']} (>= {values['target']}), "
            f"all labels {values['all_labels_seq_acc']}")


def _parity_figure(values: dict) -> str:
    return (f"decoded texts agree {values['text_agreement']} ({values['text_mismatches']} differ), "
            f"largest logit difference {values['max_abs_logit_diff']}")


def _int8_figure(values: dict) -> str:
    return (f"int8 {values['int8_img_s']} img/s against fp32 {values['fp32_img_s']} ({values['speedup']}x) at batch "
            f"256; texts agree {values['text_agreement']} ({values['text_mismatches']} differ)")


_FIGURES = {"throughput": _throughput_figure, "onnx": _onnx_figure, "http": _http_figure, "ddp": _ddp_figure,
            "stream": _stream_figure, "generation": _generation_figure, "cache_load": _cache_load_figure,
            "parity": _parity_figure, "int8": _int8_figure}


def _main_figures(benchmark: str, values: dict) -> str:
    try:
        if benchmark.startswith("train_"):
            return _training_figure(values)
        if benchmark.startswith("labels_"):
            return _labels_figure(benchmark, values)
        if benchmark.startswith("audit_"):
            return _audit_figure(values)
        if benchmark in _FIGURES:
            return _FIGURES[benchmark](values)
    except KeyError:  # a run that measured only some metrics: list what it has
        pass
    return ", ".join(f"{metric} {value}" for metric, value in values.items())


def cpu_name(machine: str) -> str:
    """The CPU of a results row's machine ("Intel(R) Xeon(R) Processor, 2 cores, 24 GiB" -> "Intel Xeon"):
    figures from different CPUs sit in one table, and the project's machine changes CPU between days."""
    name = machine.split(",")[0]
    for noise in ("(R)", "(TM)", " Processor"):
        name = name.replace(noise, "")
    return " ".join(name.split())


def current_results_table(figures: dict[str, list[dict]]) -> str:
    """One line per benchmark of ``figures`` (results.current_figures): its main figures, the
    date and CPU they were measured on and the command that measures them again."""
    lines = ["| benchmark | figure | date, CPU | command |", "|---|---|---|---|"]
    for benchmark, rows in figures.items():
        values = {row["metric"]: _figure_text(row["value"]) for row in rows}
        lines.append(f"| `{benchmark}` | {_main_figures(benchmark, values)} | {rows[-1]['date']}, "
                     f"{cpu_name(rows[-1]['machine'])} | `{rows[-1]['command']}` |")
    return "\n".join(lines) + "\n"
