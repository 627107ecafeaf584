"""``qscope app``: the Gradio explorer (Text, Compare, Steer, Feature, Monitor), the ``app`` extra.

Widgets only; everything is computed by :class:`~.explorer.Explorer`. The app never reaches the
network: analytics and the version check are off, fonts are the system's, no share link unless
asked for, and server-side rendering (a Node process) is off.
"""

from __future__ import annotations

import os
from pathlib import Path

from ._compat import preload_anyio
from .explorer import CUSTOM_DEFAULT, Explorer
from .html import CSS


def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError:
        raise ValueError("the app needs Gradio: pip install 'qscope-plugins[app]'") from None
    preload_anyio()
    return gr


def _ids(text: str) -> list[int]:
    from ..cli._explorer import parse_ids

    return parse_ids(text, 10**9, "feature")


def _short(path: str) -> str:
    """The bundled nano files by name, anything else as given."""
    from ..demo.assets import ASSETS

    return f"nano/{Path(path).name} (bundled)" if Path(path).resolve().is_relative_to(ASSETS) else path


def build_app(explorer: Explorer):
    """The ``gr.Blocks`` of the explorer (not launched)."""
    gr = _gradio()
    layers = [str(n) for n in explorer.layers]

    def guard(fn):
        def run(*args):
            try:
                return fn(*args)
            except (ValueError, KeyError, FileNotFoundError) as err:
                raise gr.Error(str(err)) from None
        return run

    def layer_controls(k_max: int, k_label: str):
        """Which layers to read and how many top features each shows (Text and Compare)."""
        return (gr.CheckboxGroup(layers, value=layers, label="Layers"),
                gr.Slider(1, k_max, value=5, step=1, label=k_label))

    def exclude_first():
        return gr.Checkbox(True, label="Exclude first token")

    with gr.Blocks(title="qscope explorer", analytics_enabled=False) as demo:
        gr.Markdown(f"### qscope explorer &middot; `{_short(explorer.model)}` &middot; SAEs `{_short(explorer.sae)}`")
        with gr.Tab("Text", elem_id="tab-text"):
            text = gr.Textbox(label="Text", lines=4, elem_id="text-input")
            with gr.Row():
                text_layers, text_k = layer_controls(20, "Top features per layer")
                text_raw = gr.Checkbox(False, label="Raw pre-activations (before Top-k / ReLU)")
                text_first = exclude_first()
            text_go = gr.Button("Analyze", variant="primary", elem_id="text-run")
            text_out = gr.HTML(elem_id="text-heatmap")
            text_go.click(guard(lambda t, ls, k, raw, first: explorer.text(t, ls, int(k), raw, first).html),
                          [text, text_layers, text_k, text_raw, text_first], text_out, api_name="text")

        with gr.Tab("Compare", elem_id="tab-compare"):
            multi = gr.Checkbox(False, label="Text sets (one text per line)")
            with gr.Row():
                text_a = gr.Textbox(label="Text A", lines=4, elem_id="compare-a")
                text_b = gr.Textbox(label="Text B", lines=4, elem_id="compare-b")
            with gr.Row():
                cmp_layers, cmp_k = layer_controls(50, "Top-K per layer")
                cmp_first = exclude_first()
                cmp_shared = gr.Checkbox(False, label="Drop shared tokens")
                cmp_prefix = gr.Checkbox(False, label="Drop common prefix")
                cmp_raw = gr.Checkbox(False, label="Raw pre-activations")
            cmp_go = gr.Button("Compare", variant="primary", elem_id="compare-run")
            cmp_out = gr.HTML(elem_id="compare-out")

            def run_compare(many, a, b, ls, k, first, shared, prefix, raw):
                split = (lambda s: s.splitlines()) if many else (lambda s: [s])
                return explorer.compare(split(a), split(b), ls, int(k), first, shared, prefix, raw)[1]

            cmp_go.click(guard(run_compare), [multi, text_a, text_b, cmp_layers, cmp_k, cmp_first, cmp_shared,
                                              cmp_prefix, cmp_raw], cmp_out, api_name="compare")

        with gr.Tab("Steer", elem_id="tab-steer"):
            prompt = gr.Textbox(label="Prompt", lines=3, elem_id="steer-prompt")
            with gr.Row():
                st_layer = gr.Dropdown(layers, value=layers[-1], label="Layer")
                st_feats = gr.Textbox(label="Features (e.g. 459 or 1,4,10-12)", elem_id="steer-features")
                st_preset = gr.Radio(["Light", "Medium", "Strong", "Custom"], value="Light", label="Strength")
                st_custom = gr.Number(CUSTOM_DEFAULT, label="Custom strength", elem_id="steer-custom")
            with gr.Row():
                st_pos = gr.Textbox("all", label="Positions (all, 0,2,5-8, -1)")
                st_gen = gr.Checkbox(True, label="Also steer generated tokens")
                st_mode = gr.Radio([("add direction", "add"), ("clamp activation", "clamp")], value="add",
                                   label="Mode")
                st_len = gr.Slider(1, 200, value=40, step=1, label="Max new tokens")
            st_go = gr.Button("Generate", variant="primary", elem_id="steer-run")
            with gr.Row():
                st_base = gr.Textbox(label="Baseline", lines=6, elem_id="steer-baseline")
                st_out = gr.Textbox(label="Steered", lines=6, elem_id="steer-steered")
            st_cmd = gr.Code(label="Reproduce with", language="shell", elem_id="steer-command")

            def run_steer(p, layer, feats, preset, custom, pos, gen, mode, n):
                r = explorer.steer(p, int(layer), _ids(feats), preset=preset, custom=float(custom or 0.0),
                                   positions=pos, generated=gen, mode=mode, max_new_tokens=int(n))
                return r["baseline"], r["steered"], r["command"]

            st_go.click(guard(run_steer), [prompt, st_layer, st_feats, st_preset, st_custom, st_pos, st_gen,
                                           st_mode, st_len], [st_base, st_out, st_cmd], api_name="steer")

        with gr.Tab("Feature", elem_id="tab-feature"):
            with gr.Row():
                fp_layer = gr.Dropdown(layers, value=layers[-1], label="Layer")
                fp_id = gr.Number(0, precision=0, label="Feature", elem_id="feature-id")
                fp_go = gr.Button("Open", variant="primary", elem_id="feature-run")
            fp_out = gr.HTML(elem_id="feature-page")
            fp_go.click(guard(lambda n, f: explorer.feature(int(n), int(f or 0))), [fp_layer, fp_id], fp_out,
                        api_name="feature")

        with gr.Tab("Monitor", elem_id="tab-monitor"):
            clf_path = gr.Textbox(label="Classifier JSON (path, from qscope classify fit)", elem_id="monitor-path")
            mon_text = gr.Textbox(label="Text", lines=4, elem_id="monitor-text")
            mon_go = gr.Button("Check", variant="primary", elem_id="monitor-run")
            mon_out = gr.HTML(elem_id="monitor-out")

            def run_monitor(path, t):
                from ..recipes.classifier import FeatureClassifier

                if not path:
                    raise ValueError("give the path of a classifier JSON")
                return explorer.monitor(FeatureClassifier.load(path.strip()), t)[2]

            mon_go.click(guard(run_monitor), [clf_path, mon_text], mon_out, api_name="monitor")
    return demo


def launch(explorer: Explorer, *, port: int | None = None, share: bool = False, host: str = "127.0.0.1",
           block: bool = True):
    """Start the server (``block=False`` returns at once; the caller closes it with ``.close()``)."""
    gr = _gradio()
    demo = build_app(explorer)
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=True,
                ssr_mode=False, theme=theme, css=CSS, inbrowser=False)
    if block:
        print(f"qscope app: serving on {demo.local_url}" + (f" and {demo.share_url}" if demo.share_url else "")
              + " (Ctrl-C stops it)", flush=True)
        demo.block_thread()  # until Ctrl-C, which closes the server
    return demo
