"""ONNX export of a compressed model, checked against PyTorch and timed in ONNX Runtime.

Export uses ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript), the exporter PyTorch
maintains; the legacy TorchScript exporter (``dynamo=False``) is deprecated and, measured with torch 2.13,
fails on more of the built-in techniques (unstructured movement pruning's bitmask, fp16 LayerNorm).
Batch size and sequence length are dynamic, so one graph serves every batch the protocol times.

What cannot be traced is refused up front, by technique name and reason (``Technique.onnx_support``);
techniques whose modules are opaque kernels rewrite a copy of the model first (``Technique.onnx_prepare``:
int8 Linears are traced as float Linears with their dequantised weights, and :func:`lower_int8` then
replaces those MatMuls by the computation fbgemm performs, in ONNX int8 ops: 7-bit dynamic activation
quantisation + ``MatMulInteger`` on the same int8 weights). ONNX Runtime's own ``quantize_dynamic`` was
tried first and rejected: it re-derives the scales and quantises activations to 8 bits, and on the
sst2-head-int8 trial 12 only 97.4% of dev predictions matched PyTorch's. Whatever the path, the
exported graph must agree
with the PyTorch model on at least :data:`MIN_AGREEMENT` of the evaluation split's argmax predictions,
or the export fails and no ``model.onnx`` is left behind: a file that silently predicts differently is
worse than none. One exception, measured rather than assumed: a dynamic int8 model is chaotic at the last
bit (each call's activation scale comes from its min/max, so a one-ulp change moves every later grid), and
PyTorch agrees with *itself* on only ~99% of SST-2 dev under a one-ulp perturbation of the embeddings
(:func:`self_agreement`); for such graphs the bar is that noise floor, when it is lower. The lowering
reproduces fbgemm's rounding bit for bit on a given input (fused multiply-add, float64 scale), which is
what separates it from ONNX's ``QuantizeLinear``: with that, trial 15 of results/sst2-all went from
97.7% to 99.4% agreement, above its 99.0% floor.

Latency is measured with :func:`autocompress.measure.latency_ms_per_example` itself, through
:class:`OrtClassifier` (an ONNX Runtime session that looks like a model to it), so the ONNX Runtime and
PyTorch figures share one protocol, one sample and one thread count.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from .errors import ModelError

if TYPE_CHECKING:
    from torch import nn

    from .data import Encoded
    from .registry import Registry
    from .technique import OnnxInt8Linear

ONNX_FILE = "model.onnx"
MIN_AGREEMENT = 0.995  # argmax agreement with PyTorch on the evaluation split, below which export fails
_MODEL_ATTR = "model"  # the wrapper's attribute holding the classifier: ONNX name scopes start with it


def example_batch(enc: "Encoded", *, pad_token_id: int) -> dict[str, Any]:
    """The batch that fixes the exported graph's inputs: the 4 longest examples (>= 2 rows and tokens, so no
    dimension is specialised to 1)."""
    from .data import batches

    longest = np.argsort(-enc.lengths(), kind="stable")[:4]
    return next(batches(enc, batch_size=len(longest), indices=longest, pad_token_id=pad_token_id))


def missing_dependencies() -> list[str]:
    """The ONNX packages this export needs and this environment lacks."""
    import importlib.util

    return [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]


def blockers(recipe: list[Mapping[str, Any]], registry: "Registry") -> list[tuple[str, str]]:
    """``(technique, reason)`` for every recipe step whose technique says it cannot be exported."""
    out: list[tuple[str, str]] = []
    for step in recipe:
        name = step["technique"]
        if name not in registry.techniques:
            continue  # load_compressed reports the missing plugin with its fix
        reason = registry.get(name).onnx_support(step.get("params") or {})
        if reason and (name, reason) not in out:
            out.append((name, reason))
    return out


def preflight(recipe: list[Mapping[str, Any]], registry: "Registry") -> None:
    """Refuse before any work when the ONNX packages are missing or a technique cannot be exported."""
    missing = missing_dependencies()
    if missing:
        raise ModelError(f"--onnx needs the packages {', '.join(missing)}; install them with "
                         f"pip install 'autocompress[onnx]' (onnx, onnxruntime, onnxscript)")
    blocked = blockers(recipe, registry)
    if blocked:
        raise ModelError("--onnx: this pipeline cannot be exported to ONNX: " + "; ".join(
            f"technique {name!r}: {reason}" for name, reason in blocked)
            + ". Export it without --onnx (autocompress.load runs it in PyTorch), or pick a trial without it")


class OrtClassifier:
    """An ONNX Runtime session behind the calling convention of a transformers classifier
    (``model(**batch).logits``), so :mod:`autocompress.measure` predicts and times it unchanged.

    ``threads`` fixes ONNX Runtime's intra-op pool to the thread count PyTorch is timed with; one
    inter-op thread, as a BERT graph is a chain.
    """

    def __init__(self, path: str | Path, *, threads: int, thread_affinities: str | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, int(threads))
        opts.inter_op_num_threads = 1
        if thread_affinities:  # ONNX Runtime's format: one logical processor (1-based) per worker, ";"-separated
            opts.add_session_config_entry("session.intra_op_thread_affinities", thread_affinities)
        opts.log_severity_level = 3  # errors only: its graph-optimiser notes are not the user's business
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelError(f"ONNX Runtime cannot load {str(path)!r}: {exc}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.threads = opts.intra_op_num_threads

    def eval(self) -> "OrtClassifier":
        return self

    def __call__(self, **batch: Any) -> SimpleNamespace:
        import torch

        feeds = {name: batch[name].detach().cpu().numpy() for name in self.input_names}
        logits = self.session.run(None, feeds)[0]
        return SimpleNamespace(logits=torch.from_numpy(np.asarray(logits)))


def _wrapper(model: "nn.Module", input_names: list[str]) -> "nn.Module":
    """A module whose positional inputs are exactly ``input_names`` and whose only output is the logits."""
    from torch import nn

    class Logits(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            setattr(self, _MODEL_ATTR, inner)

        def forward(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None) -> Any:
            # Named parameters (not *args): torch.export matches dynamic shapes to them one by one.
            given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            return getattr(self, _MODEL_ATTR)(**{k: given[k] for k in input_names}).logits

    return Logits(model).eval()


def _module_of(node: Any, model: "nn.Module") -> "nn.Module | None":
    """The innermost module of ``model`` a node was traced in, from the name scopes the dynamo exporter
    records on every node (``pkg.torch.onnx.name_scopes``)."""
    import ast

    meta = {p.key: p.value for p in node.metadata_props}
    try:
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
    except (ValueError, SyntaxError):
        return None
    for scope in reversed(scopes):  # innermost first
        if str(scope).startswith(_MODEL_ATTR + "."):
            try:
                return model.get_submodule(str(scope)[len(_MODEL_ATTR) + 1:])
            except AttributeError:
                continue
    return None


def int8_constants() -> list[Any]:
    """The scalar initializers every lowered int8 MatMul shares (names start with ``ac_``)."""
    from onnx import numpy_helper

    consts = {"ac_zero": np.array(0.0, np.float32), "ac_one": np.array(1.0, np.float32),
              "ac_u8max": np.array(255.0, np.float32), "ac_zerod": np.array(0.0, np.float64),
              "ac_tiny": np.array(1e-30, np.float64)}
    return [numpy_helper.from_array(value, name) for name, value in consts.items()]


def int8_weight_initializers(key: str, weight_int8: np.ndarray, row_scale: np.ndarray, *, levels: int) -> list[Any]:
    """One int8 Linear's initializers: weights ``[in, out]`` int8, one float32 scale per output, and the number
    of activation levels (127: fbgemm's 7-bit ``reduce_range``)."""
    from onnx import numpy_helper

    return [numpy_helper.from_array(np.ascontiguousarray(weight_int8.astype(np.int8).T), key + "_w"),
            numpy_helper.from_array(row_scale.astype(np.float32), key + "_ws"),
            numpy_helper.from_array(np.array(float(levels), np.float64), key + "_levels")]


def int8_matmul_nodes(x: str, out: str, *, key: str, tag: str, bias: str | None = None) -> list[Any]:
    """ONNX nodes computing ``out = dynamic_int8_linear(x) (+ bias)`` exactly as fbgemm does, with the
    weights of :func:`int8_weight_initializers` ``key`` and the constants of :func:`int8_constants`;
    ``tag`` prefixes the intermediate names.

    fbgemm's dynamic quantisation, step for step (``quant_utils::ChooseQuantizationParams``, then
    ``fbgemm::Quantize``): scale = (hi - lo) / levels in double, stored as float; zero point from the double
    scale; ``x_q = round_half_even(fma(x, 1/scale, zero_point))`` with 1/scale in float. The fused multiply-add
    rounds once; ONNX's ``QuantizeLinear`` computes ``round(x / scale) + zero_point`` instead, which flips a few
    ``x_q`` by one level per call, and those flips compound over a dozen int8 layers into a visibly different
    model (97.7% argmax agreement on SST-2 dev for a four-technique front point, against 99.4% with this). In
    float64, ``x * (1/scale)`` is exact and the add rounds once, so the cast back to float gives the fma result.
    """
    from onnx import TensorProto, helper

    t = tag
    nodes = [
        helper.make_node("ReduceMin", [x], [t + "_min"], keepdims=0),
        helper.make_node("ReduceMax", [x], [t + "_max"], keepdims=0),
        helper.make_node("Min", [t + "_min", "ac_zero"], [t + "_lo"]),
        helper.make_node("Max", [t + "_max", "ac_zero"], [t + "_hi"]),
        helper.make_node("Cast", [t + "_lo"], [t + "_lod"], to=TensorProto.DOUBLE),
        helper.make_node("Cast", [t + "_hi"], [t + "_hid"], to=TensorProto.DOUBLE),
        helper.make_node("Sub", [t + "_hid", t + "_lod"], [t + "_range"]),
        helper.make_node("Div", [t + "_range", key + "_levels"], [t + "_s0"]),
        helper.make_node("Max", [t + "_s0", "ac_tiny"], [t + "_sd"]),  # all-zero input: any scale works
        helper.make_node("Cast", [t + "_sd"], [t + "_s"], to=TensorProto.FLOAT),
        helper.make_node("Div", [t + "_lod", t + "_sd"], [t + "_zneg"]),
        helper.make_node("Neg", [t + "_zneg"], [t + "_z"]),
        helper.make_node("Round", [t + "_z"], [t + "_zr"]),
        helper.make_node("Clip", [t + "_zr", "ac_zerod", key + "_levels"], [t + "_zc"]),
        helper.make_node("Cast", [t + "_zc"], [t + "_zp"], to=TensorProto.UINT8),
        helper.make_node("Div", ["ac_one", t + "_s"], [t + "_inv"]),
        helper.make_node("Cast", [t + "_inv"], [t + "_invd"], to=TensorProto.DOUBLE),
        helper.make_node("Cast", [x], [t + "_xd"], to=TensorProto.DOUBLE),
        helper.make_node("Mul", [t + "_xd", t + "_invd"], [t + "_xs"]),
        helper.make_node("Add", [t + "_xs", t + "_zc"], [t + "_xz"]),
        helper.make_node("Cast", [t + "_xz"], [t + "_xf"], to=TensorProto.FLOAT),
        helper.make_node("Round", [t + "_xf"], [t + "_xr"]),
        helper.make_node("Clip", [t + "_xr", "ac_zero", "ac_u8max"], [t + "_xc"]),
        helper.make_node("Cast", [t + "_xc"], [t + "_xq"], to=TensorProto.UINT8),
        helper.make_node("MatMulInteger", [t + "_xq", key + "_w", t + "_zp"], [t + "_acc"]),
        helper.make_node("Cast", [t + "_acc"], [t + "_accf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [t + "_s", key + "_ws"], [t + "_scale"]),
    ]
    return nodes + _rescale(t, out, bias)


def _rescale(t: str, out: str, bias: str | None) -> list[Any]:
    """``out = acc * (activation scale * row scale) (+ bias)``: the float tail of both int8 lowerings."""
    from onnx import helper

    if bias:
        return [helper.make_node("Mul", [t + "_accf", t + "_scale"], [t + "_y"]),
                helper.make_node("Add", [t + "_y", bias], [out])]
    return [helper.make_node("Mul", [t + "_accf", t + "_scale"], [out])]


def int8_matmul_nodes_ort(x: str, out: str, *, key: str, tag: str, bias: str | None = None) -> list[Any]:
    """ONNX Runtime's own dynamic int8 MatMul (``DynamicQuantizeLinear`` with 8-bit activations +
    ``MatMulInteger``, which its optimiser fuses into one kernel): faster than :func:`int8_matmul_nodes`, but
    8-bit rather than fbgemm's 7-bit activations, so it computes a slightly different model. Used where ONNX
    Runtime is the runtime that is measured (``measurement.runtime: onnxruntime``), never to claim parity."""
    from onnx import TensorProto, helper

    t = tag
    nodes = [
        helper.make_node("DynamicQuantizeLinear", [x], [t + "_xq", t + "_s", t + "_zp"]),
        helper.make_node("MatMulInteger", [t + "_xq", key + "_w", t + "_zp"], [t + "_acc"]),
        helper.make_node("Cast", [t + "_acc"], [t + "_accf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", [t + "_s", key + "_ws"], [t + "_scale"]),
    ]
    return nodes + _rescale(t, out, bias)


def lower_int8(path: Path, model: "nn.Module", int8: Mapping[str, "OnnxInt8Linear"], *,
               mode: str = "exact") -> dict[str, Any]:
    """Rewrite, in the ONNX file at ``path``, every float MatMul/Gemm that computes one of the ``int8`` Linears
    into the int8 dynamic-quantised computation fbgemm performs: per-tensor asymmetric activation
    quantisation from the call's min/max (0 included) to ``activation_levels``, ``MatMulInteger`` against the
    int8 weights (exact int32 accumulation), then ``acc * (activation scale * row scale)``; a bias Add that
    follows is left as it is. Nodes are matched to modules by *object* (``model`` is the prepared copy that
    was traced), so a Linear shared by several layers matches everywhere and its weights are stored once."""
    import onnx
    from onnx import helper, numpy_helper

    graph_model = onnx.load(str(path))
    graph = graph_model.graph
    inits = {i.name: i for i in graph.initializer}
    wanted = {id(model.get_submodule(name)): name for name in int8}
    made: set[str] = set()
    nodes: list[Any] = []
    lowered = 0
    graph.initializer.extend(int8_constants())
    for node in graph.node:
        module = _module_of(node, model) if node.op_type in ("MatMul", "Gemm") else None
        name = wanted.get(id(module)) if module is not None else None
        if name is None or len(node.input) < 2 or node.input[1] not in inits:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        spec = int8[name]
        w = spec.weight_int8.detach().cpu().numpy().astype(np.int8)  # [out, in]
        scale = spec.scale.detach().cpu().numpy().astype(np.float32)  # [out]
        b = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        if node.op_type == "Gemm" and not attrs.get("transB", 0):
            b = b.T
        b = b if node.op_type == "Gemm" else b.T  # now [out, in], as the weight
        if node.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0
                                       or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        if b.shape != w.shape or not np.allclose(b, w.astype(np.float32) * scale[:, None], rtol=1e-5, atol=1e-7):
            raise ModelError(f"ONNX export: node {node.name} does not hold the weight of the int8 Linear {name} "
                             f"(shape {b.shape}, expected {w.shape}); this exporter version is not supported for int8")
        key = "ac_" + name.replace(".", "_")
        if key not in made:  # once per module: shared layers keep one copy of their int8 weights
            made.add(key)
            graph.initializer.extend(int8_weight_initializers(key, w, scale, levels=spec.activation_levels))
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
        emit = int8_matmul_nodes if mode == "exact" else int8_matmul_nodes_ort
        nodes += emit(node.input[0], node.output[0], key=key, tag=f"{node.name}_ac", bias=bias)
        lowered += 1
    if int8 and not lowered:
        raise ModelError("ONNX export: none of the int8 Linears could be found in the exported graph (no module name "
                         "scopes on its MatMul nodes); this torch version is not supported for int8 export")
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [i for i in graph.initializer if i.name in used]  # the float copies of the int8 weights go
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.value_info[:]  # the exporter's shape hints describe the float graph; let runtimes re-infer
    onnx.checker.check_model(graph_model)
    onnx.save(graph_model, str(path))
    if mode != "exact":
        return {"linears": len(int8), "matmul_nodes": lowered, "activation_bits": 8, "mode": mode,
                "kernels": "ONNX Runtime's DynamicQuantizeLinear (8-bit activations) + MatMulInteger (int8 weights, "
                           "int32 accumulation) + float rescale"}
    return {"linears": len(int8), "matmul_nodes": lowered, "activation_bits": 7, "mode": mode,
            "kernels": "per-tensor asymmetric activation quantisation from the call's min/max (fbgemm's rounding) + "
                       "MatMulInteger "
                       "(int8 weights, int32 accumulation) + float rescale, as fbgemm's dynamic int8 Linear"}


def export_graph(model_dir: str | Path, out_path: str | Path, *, registry: "Registry", example: Mapping[str, Any],
                 log: Callable[[str], None] = print, int8_mode: str = "exact") -> dict[str, Any]:
    """Export the compressed model saved in ``model_dir`` to ``out_path``; ``example`` is one batch (at least
    two rows, so the batch dimension is not specialised to 1) that fixes the input names. Returns what
    was done (int8 re-quantisation, exporter versions)."""
    import json

    import torch

    from .modeling import RECIPE_FILE, load_compressed

    recipe = json.loads((Path(model_dir) / RECIPE_FILE).read_text())
    preflight(recipe, registry)
    model = load_compressed(model_dir, device="cpu", registry=registry)  # a private copy: prepare may rewrite it
    int8: dict[str, OnnxInt8Linear] = {}
    for step in recipe:
        lowered = registry.get(step["technique"]).onnx_prepare(model, params=step.get("params") or {},
                                                                 record=step.get("record"))
        int8.update(lowered or {})
    input_names = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in example]
    args = tuple(example[k].cpu() for k in input_names)
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=1)
    out_path = Path(out_path)
    captured = io.StringIO()
    started = time.perf_counter()
    try:
        # The exporter prints progress to stdout and warns a lot; keep the CLI output for results.
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured), \
                _quiet_logger("torch.onnx"), _quiet_logger("torch.export"):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(_wrapper(model, input_names), args, dynamo=True,
                                        input_names=input_names, output_names=["logits"],
                                        dynamic_shapes=tuple({0: batch, 1: seq} for _ in input_names))
            program.save(str(out_path), external_data=False)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types; all mean "cannot export"
        out_path.unlink(missing_ok=True)
        first = _summary(exc)
        techniques = ", ".join(dict.fromkeys(s["technique"] for s in recipe)) or "(none)"
        raise ModelError(f"--onnx: torch.onnx could not export this model (pipeline: {techniques}): "
                         f"{type(exc).__name__}: {first[:400]}. Export without --onnx; if one technique is the "
                         f"cause, its plugin should say so in Technique.onnx_support") from None
    info: dict[str, Any] = {"exporter": f"torch.onnx dynamo (torch {torch.__version__}, onnxscript "
                                        f"{_version('onnxscript')})", "inputs": input_names,
                            "int8": None}
    try:
        if int8:
            info["int8"] = lower_int8(out_path, model, int8, mode=int8_mode)
        _tidy(out_path)
    except BaseException:
        out_path.unlink(missing_ok=True)
        raise
    log(f"Exported {out_path.name} ({out_path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - started:.0f}s")
    return info


def _tidy(path: Path) -> None:
    """Drop the per-node trace metadata (source stack, module scopes: needed only to find the int8 Linears,
    several hundred KB of text) and store identical constant tensors once. The exporter folds a weight's
    transpose separately at every use, so a weight shared by several layers (weight sharing) would
    otherwise be stored once per layer and the ONNX file would lose the saving the technique made."""
    import hashlib

    import onnx

    graph_model = onnx.load(str(path))
    graph = graph_model.graph
    for node in graph.node:
        del node.metadata_props[:]
    if not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        first: dict[tuple[Any, ...], str] = {}
        alias: dict[str, str] = {}
        for init in graph.initializer:
            anonymous = onnx.TensorProto()
            anonymous.CopyFrom(init)
            anonymous.name = ""  # equal content under different names is the duplicate we look for
            key = (init.data_type, tuple(init.dims), hashlib.sha256(anonymous.SerializeToString()).hexdigest())
            alias[init.name] = first.setdefault(key, init.name)
        alias = {k: v for k, v in alias.items() if k != v}
        if alias:
            for node in graph.node:
                node.input[:] = [alias.get(i, i) for i in node.input]
            kept = [i for i in graph.initializer if i.name not in alias]
            del graph.initializer[:]
            graph.initializer.extend(kept)
    onnx.save(graph_model, str(path))


@contextlib.contextmanager
def _quiet_logger(name: str) -> Any:
    """Silence a library logger for a while (the exporter logs e.g. skipped torchvision ops as warnings)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _summary(exc: BaseException) -> str:
    """The informative line of an exporter error: the one after its "Exception summary" header (the first
    line is a generic banner), else the first non-empty line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "Exception summary" in line and i + 1 < len(lines):
            return lines[i + 1]
    return lines[0] if lines else type(exc).__name__


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001
        return "?"


def self_agreement(model: "nn.Module", evaluation: "Encoded", *, pad_token_id: int, seeds: tuple[int, ...] = (0, 1),
                   batch_size: int = 64) -> dict[str, Any]:
    """How often ``model`` agrees with its own unperturbed predictions when the embedding output is perturbed by
    one float32 ulp (relative noise ``eps * N(0, 1)``), averaged over ``seeds``: the noise floor of a parity
    check. Dynamic int8 quantises each activation with the min/max of the whole call, so a last-bit change
    anywhere moves every quantisation grid after it; a float model scores 100% here, a dynamic int8 BERT
    about 99% (measured on SST-2 dev, results/sst2-all trial 15)."""
    import torch

    from .measure import predict
    from .surgery import base_model

    eps = float(torch.finfo(torch.float32).eps)
    reference_logits = predict(model, evaluation, batch_size=batch_size, pad_token_id=pad_token_id)
    agreements, diffs = [], []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)

        def nudge(module: Any, inputs: Any, output: torch.Tensor, gen: torch.Generator = gen) -> torch.Tensor:
            noise = torch.randn(output.shape, generator=gen).to(output.device, output.dtype)
            return output * (1 + eps * noise)

        handle = base_model(model).embeddings.register_forward_hook(nudge)
        try:
            logits = predict(model, evaluation, batch_size=batch_size, pad_token_id=pad_token_id)
        finally:
            handle.remove()
        agreements.append(float(np.mean(logits.argmax(-1) == reference_logits.argmax(-1))))
        diffs.append(float(np.max(np.abs(logits.astype(np.float64) - reference_logits))))
    return {"agreement": float(np.mean(agreements)), "per_seed": agreements, "max_abs_logit_diff": max(diffs),
            "perturbation": f"embedding output x (1 + {eps:.3g} * N(0,1)), seeds {list(seeds)}"}


def check_and_time(
    onnx_path: str | Path,
    *,
    torch_model: "nn.Module",
    evaluation: "Encoded",
    reference_logits: np.ndarray,
    latency_sets: Mapping[int, "Encoded"],
    warmup: int,
    repeats: int,
    pad_token_id: int,
    split: str,
    dynamic_int8: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Parity of the ONNX graph with ``reference_logits`` (PyTorch on ``evaluation``), then ms/example in ONNX
    Runtime and in PyTorch, back to back under the same protocol. Raises (and deletes the file) when the
    argmax agreement is below :data:`MIN_AGREEMENT` -- or, for a graph with dynamic int8 layers
    (``dynamic_int8``), below PyTorch's own agreement with itself under a one-ulp perturbation
    (:func:`self_agreement`), if that is lower: such a model is not a deterministic function of its input at
    the last bit, so no runtime can match it more closely than it matches itself."""
    import torch

    from .measure import latency_ms_per_example, predict

    path = Path(onnx_path)
    session = OrtClassifier(path, threads=torch.get_num_threads())
    logits = predict(session, evaluation, batch_size=64, pad_token_id=pad_token_id)
    agreement = float(np.mean(logits.argmax(-1) == reference_logits.argmax(-1))) if len(logits) else 1.0
    max_diff = float(np.max(np.abs(logits.astype(np.float64) - reference_logits))) if len(logits) else 0.0
    parity: dict[str, Any] = {"split": split, "examples": int(len(logits)), "agreement": agreement,
                              "max_abs_logit_diff": max_diff, "threshold": MIN_AGREEMENT}
    if agreement < MIN_AGREEMENT and dynamic_int8:
        floor = self_agreement(torch_model, evaluation, pad_token_id=pad_token_id)
        parity["pytorch_self_agreement"] = floor
        parity["threshold"] = min(MIN_AGREEMENT, floor["agreement"])
        log(f"dynamic int8: PyTorch agrees with itself on {floor['agreement']:.2%} of {split} under a one-ulp "
            f"perturbation (max |logit diff| {floor['max_abs_logit_diff']:.3g}); that is the bar for ONNX")
    if agreement < parity["threshold"]:
        path.unlink(missing_ok=True)
        raise ModelError(f"--onnx: the ONNX model agrees with PyTorch on only {agreement:.2%} of the {len(logits)} "
                         f"{split} predictions (max |logit diff| {max_diff:.3g}; at least {parity['threshold']:.2%} is "
                         f"required), so no model.onnx was written. Export without --onnx")
    log(f"ONNX parity on {split}: {agreement:.2%} argmax agreement, max |logit diff| {max_diff:.3g}")
    # ONNX Runtime is timed in a fresh process, PyTorch here once the session is gone: in one process each
    # runtime slowed the other (up to 2x for ONNX Runtime; bench_timing.final_timing says how it was found).
    from .bench_timing import time_onnx_alone

    threads = session.threads
    del session
    latency: dict[str, dict[str, Any]] = {"onnxruntime": time_onnx_alone(path, latency_sets, warmup=warmup,
                                                                         repeats=repeats, pad_token_id=pad_token_id,
                                                                         threads=threads), "pytorch": {}}
    for bs, enc in latency_sets.items():
        lat = latency_ms_per_example(torch_model, enc, batch_size=bs, device="cpu", warmup=warmup, repeats=repeats,
                                     pad_token_id=pad_token_id)
        latency["pytorch"][f"latency_bs{bs}"] = lat["median"]
        latency["pytorch"][f"latency_bs{bs}_spread"] = [lat["min"], lat["max"]]
        log(f"  bs{bs}: ONNX Runtime {latency['onnxruntime'][f'latency_bs{bs}']:.3g} ms/ex, "
            f"PyTorch {latency['pytorch'][f'latency_bs{bs}']:.3g} ms/ex")
    import onnxruntime

    return {"file": path.name, "size_mb": path.stat().st_size / 1e6, "parity": parity,
            "runtime": f"onnxruntime {onnxruntime.__version__}, CPUExecutionProvider, {threads} threads (timed in a "
                       "fresh process)",
            "latency_ms_per_example": latency, "examples_timed": {bs: len(e) for bs, e in latency_sets.items()}}
