"""The names of the exported graphs: their kinds, their precisions, and the file each (kind, precision) is.

One vocabulary from the command line to the graph file: `vae export --precision fp16,int8`, `export(...,
precisions=("fp16", "int8"))`, the flow's `precisions` parameter, the runtime's `precision=` and the file names in
a model folder or a registry version all say these names, and `graph_name` is the one place a file name is made:

    encoder, decoder            the graph kinds (`KINDS`)
    fp32                        the plain graph, always exported: `decoder.onnx`, `encoder.onnx`
    fp16                        float16 weights behind a float32 interface, for GPUs: `decoder.fp16.onnx`
    int8                        int8 weights and activations, for CPUs: `decoder.int8.onnx`, `encoder.int8.onnx`

Older spellings are read as these names: `float32` (and no precision at all) is fp32, `float16` is fp16. A graph's
`metadata_props` say its precision in ONNX's element-type words (`float32`, `float16`, `int8`: `metadata_name`),
which exports have always written and which apps in any language read; `precision_name` reads them back. A
precision outside the vocabulary is refused in one line naming it and the known ones.
"""

from __future__ import annotations

from vae_runtime.errors import BadInput, shown

KINDS = ("encoder", "decoder")
PLAIN = "fp32"  # the precision of the graphs every export writes, whose file names carry no precision
PRECISIONS = (PLAIN, "fp16", "int8")
REDUCED = tuple(p for p in PRECISIONS if p != PLAIN)  # the graphs an export writes when asked for them
OLDER_SPELLINGS = {"float32": "fp32", "float16": "fp16"}  # what earlier code and the graphs' metadata say
METADATA_NAMES = {"fp32": "float32", "fp16": "float16", "int8": "int8"}  # a graph's metadata_props["precision"]
# the kinds an export writes at each precision: float16 is for decoding on GPUs, so it has no encoder
EXPORTED = {"fp32": KINDS, "fp16": ("decoder",), "int8": KINDS}
# why a precision that apps ask for is not one of ours
NOT_OFFERED = {"bf16": "onnxruntime's CPU provider has no bf16 convolution or matrix-product kernels"}


def precision_name(value, error: type[Exception] = BadInput, what: str = "precision") -> str:
    """The vocabulary's name of a precision given in any spelling it reads: None and `float32` are `fp32`, `float16`
    is `fp16`. Anything else raises `error` (one line naming `what`, the value and the known precisions)."""
    if value is None:
        return PLAIN
    name = OLDER_SPELLINGS.get(value, value) if isinstance(value, str) else None
    if name in PRECISIONS:
        return name
    why = f"; {NOT_OFFERED[value]}" if isinstance(value, str) and value in NOT_OFFERED else ""
    raise error(f"{what} {shown(value)}: not offered (the precisions: {', '.join(PRECISIONS)}; "
                f"{', '.join(f'{old} is read as {new}' for old, new in OLDER_SPELLINGS.items())}){why}")


def precision_names(values, error: type[Exception] = BadInput, what: str = "precision") -> tuple[str, ...]:
    """The reduced precisions asked for by `values` (any spellings, any order, repeats): each checked by
    `precision_name`, in the vocabulary's order, fp32 dropped (every export writes it)."""
    if isinstance(values, str) or values is None:
        values = () if values is None else (values,)
    names = {precision_name(value, error, what) for value in values}
    return tuple(p for p in REDUCED if p in names)


def graph_name(kind: str, precision: str | None = None, error: type[Exception] = BadInput) -> str:
    """The file of the `kind` graph at `precision` (any spelling `precision_name` reads): `decoder.onnx` for fp32,
    `decoder.<precision>.onnx` for a reduced one."""
    if kind not in KINDS:
        raise error(f"graph kind {shown(kind)}: expected one of {', '.join(KINDS)}")
    precision = precision_name(precision, error)
    return f"{kind}.onnx" if precision == PLAIN else f"{kind}.{precision}.onnx"


def parse_graph_name(name: str) -> tuple[str, str] | None:
    """(kind, precision) of a graph file `graph_name` makes (`decoder.fp16.onnx` -> ("decoder", "fp16")); None for
    any other name (model.json, a weights file, a graph of a precision outside the vocabulary)."""
    parts = name.split(".") if isinstance(name, str) else []
    if len(parts) == 2 and parts[1] == "onnx" and parts[0] in KINDS:
        return parts[0], PLAIN
    if len(parts) == 3 and parts[2] == "onnx" and parts[0] in KINDS and parts[1] in REDUCED:
        return parts[0], parts[1]
    return None


def graph_names(precisions=()) -> list[str]:
    """The graphs an export with the reduced `precisions` writes, in the order it lists them: the fp32 encoder and
    decoder first, then each precision's (`EXPORTED`)."""
    return [graph_name(kind, p) for p in (PLAIN, *precision_names(precisions)) for kind in EXPORTED[p]]


def metadata_name(precision: str) -> str:
    """What a graph's `metadata_props["precision"]` says for `precision` (ONNX's element-type words)."""
    return METADATA_NAMES[precision_name(precision)]
