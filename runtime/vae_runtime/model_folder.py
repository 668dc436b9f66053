"""What the runtime checks of a model before it runs it: a model folder's graphs against its card, the files a
graph reads besides itself, and the sizes a model declares.

A model folder (what `vae export` writes) holds graphs named by `vae_runtime.vocabulary` and `model.json`, which
lists every graph's sha256: a graph is loaded only when it matches (a folder exported before hashes loads with a
warning). What a graph reads besides itself (external weights) is checked with it: a plain file beside it, within
the size caps (`vae_runtime.limits`: `onnx`, `onnx_data`), and hashed in the card when the graph is. The sizes a
model declares (latent_dim, image_size, channels) are bounded, and a card that declares others than its graph has
is refused, before anything is sized from them.
"""

from __future__ import annotations

import json
import os
import warnings

from vae_runtime import graph_files, schemas, storage
from vae_runtime.digest import sha256_file
from vae_runtime.errors import BadInput, RuntimeModelError, one_line
from vae_runtime.limits import OverCap
from vae_runtime.vocabulary import EXPORTED, PLAIN, parse_graph_name

CARD = "model.json"
# Bounds on what a model declares, checked before anything is sized from it: far beyond this project's models
# (latent_dim 128-512, 64x64 RGB images), far below what would exhaust a machine's memory.
MAX_LATENT_DIM = 1 << 16
MAX_IMAGE_SIZE = 4096
MAX_CHANNELS = 4
SIZES = {"latent_dim": MAX_LATENT_DIM, "image_size": MAX_IMAGE_SIZE, "channels": MAX_CHANNELS}


def verified_graph(folder: str | os.PathLike, name: str) -> str:
    """`folder/name`, checked against the sha256 that the folder's `model.json` lists for it.

    The folder is resolved once (an export's `--out` is a link switched whole), so the graph and the card come
    from one export. A folder whose card lists no hashes (exported before they existed) loads with a warning."""
    given, folder = folder, os.path.realpath(folder)
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        held = sorted(n for n in os.listdir(folder) if n.endswith(".onnx")) if os.path.isdir(folder) else []
        raise RuntimeModelError(f"model folder {given}: no {name} (it holds {', '.join(held) or 'no graphs'})"
                                f"{_export_hint(name)}")
    try:
        card = json.loads(storage.read_capped(os.path.join(folder, CARD), "json"))
    except FileNotFoundError:
        raise RuntimeModelError(f"model folder {folder}: no {CARD} (pass the .onnx file itself to load "
                                "a graph without its card)") from None
    except OverCap:
        raise
    except ValueError as err:
        raise RuntimeModelError(f"model folder {folder}: {CARD} is not valid JSON ({err})") from None
    except RecursionError:  # the parser's depth limit: no card nests past a few levels
        raise RuntimeModelError(f"model folder {folder}: {CARD} is not a model card (nested too deeply)") from None
    if not isinstance(card, dict):
        raise RuntimeModelError(f"model folder {folder}: {CARD} is not a model card (a JSON object)")
    hashes = card.get("sha256")
    if "sha256" in card and not (isinstance(hashes, dict) and hashes
                                 and all(isinstance(v, str) for v in hashes.values())):
        raise RuntimeModelError(f"model folder {folder}: {CARD}'s sha256 is not a mapping of graph names to "
                                f"digests (damaged card)")
    schemas.check(card, schemas.MODEL_CARD, f"model folder {folder}: {CARD}", "a model card", RuntimeModelError)
    if not hashes:
        warnings.warn(f"model folder {folder}: {CARD} lists no sha256 (an older export); {name} is not "
                      "verified", RuntimeWarning, stacklevel=3)
        return path
    if name not in hashes:
        raise RuntimeModelError(f"model folder {folder}: {CARD} lists no sha256 for {name}")
    referenced = checked_graph_files(path)  # size caps first: nothing over them is hashed
    if sha256_file(path) != hashes[name]:
        raise RuntimeModelError(f"model {path}: sha256 differs from {CARD}'s (damaged or replaced file)")
    # A card written before external weights were hashed lists its graphs alone: export writes graphs that hold
    # all their weights, so such a card still loads; a graph that reads a file the card does not hash is refused.
    for data in referenced:
        if data not in hashes:
            raise RuntimeModelError(f"model folder {folder}: {name} keeps weights in {data}, for which {CARD} "
                                    "lists no sha256")
        if sha256_file(os.path.join(folder, data)) != hashes[data]:
            raise RuntimeModelError(f"model {os.path.join(folder, data)}: sha256 differs from {CARD}'s (damaged "
                                    f"or replaced weights of {name})")
    return path


def _export_hint(name: str) -> str:
    """How to get the missing graph `name`: the export's precision flag, where an export writes that graph."""
    found = parse_graph_name(name)
    if found is None or found[1] == PLAIN:
        return ""
    kind, precision = found
    if kind not in EXPORTED[precision]:
        return f"; an export writes no {kind} at {precision} (its {precision} graphs: " \
               f"{', '.join(EXPORTED[precision])})"
    return f"; export it with `vae export --precision {precision}`"


def checked_graph_files(path: str, present: bool = True) -> list[str]:
    """The files the graph `path` keeps weights in (ONNX external data, `vae_runtime.graph_files`): plain names
    beside it, the graph within its size cap (`onnx`) and, with `present`, each file there and within its own
    (`onnx_data`)."""
    try:
        return graph_files.check_referenced(path) if present else graph_files.referenced_files(path)
    except OverCap:
        raise
    except BadInput as err:
        raise RuntimeModelError(str(err)) from None


def declared_sizes(metadata: dict, path: str) -> dict[str, int]:
    """{latent_dim, image_size, channels} from a graph's metadata_props, each an integer within its bound
    (`SIZES`), checked before anything is sized from them."""
    try:
        sizes = {key: int(metadata[key]) for key in SIZES}
    except (KeyError, ValueError) as err:
        raise RuntimeModelError(f"model {path}: metadata_props lack or garble {err} (not an export of "
                                "this project)") from None
    for key, top in SIZES.items():
        if not 1 <= sizes[key] <= top:
            raise RuntimeModelError(f"model {path}: its metadata declares {key} {sizes[key]}, outside [1, {top}]")
    return sizes


def check_card(card: str | None, sizes: dict[str, int], path: str) -> None:
    """The sizes the model card `card` declares against those of its graph `path` (`sizes`, checked against the
    graph's inputs and outputs): a card that says otherwise is refused, so no size is ever taken from a
    declaration the graph disagrees with. None: a graph loaded without a card."""
    if card is None:
        return
    try:
        declared = json.loads(storage.read_capped(card, "json"))
    except OverCap:
        raise
    except (OSError, ValueError) as err:
        raise RuntimeModelError(f"model card {card}: cannot be read ({one_line(err)})") from None
    if not isinstance(declared, dict):
        raise RuntimeModelError(f"model card {card}: not a model card (a JSON object)")
    for key in SIZES:
        value, actual = declared.get(key), sizes[key]
        if key in declared and (type(value) is not int or value != actual):
            raise RuntimeModelError(f"model folder {os.path.dirname(card)}: {CARD} declares {key} "
                                    f"{value!r:.40}, its graph {os.path.basename(path)} has {actual} "
                                    "(the card and the graph disagree)")
