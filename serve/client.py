"""Example client of the talkmesh style service (see serve/README.md).

python serve/client.py --url http://127.0.0.1:8000 info
python serve/client.py style --audio ref.wav --motion ref_vertices.npy [--template template.npy] [--name alice]
python serve/client.py animate --audio speech.wav --style sty_... --out motion.npz [--preview preview.mp4]
"""

from __future__ import annotations

import argparse
import json
import sys

from talkmesh.serving.client import ServiceError, StyleClient


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="method, model version, fps, training speakers")
    s = sub.add_parser("style", help="adapt to a reference clip (~10 s of a new speaker)")
    s.add_argument("--audio", required=True)
    s.add_argument("--motion", required=True, help=".npy vertices (T, V, 3) or FLAME params (T, 53|56)")
    s.add_argument("--template", help=".npy (V, 3) neutral face")
    s.add_argument("--name", default="")
    a = sub.add_parser("animate", help="animate speech in a style")
    a.add_argument("--audio", required=True)
    a.add_argument("--style", default="", help="style id, training speaker, or 'id:0.7,id2:0.3'")
    a.add_argument("--template", help=".npy (V, 3) neutral face (default: the style's)")
    a.add_argument("--out", default="motion.npz", help="motion file (.npz: every output + fps)")
    a.add_argument("--preview", help="also write a preview video (.mp4)")
    args = p.parse_args(argv)

    client = StyleClient(args.url)
    try:
        if args.cmd == "info":
            print(json.dumps(client.info(), indent=2))
        elif args.cmd == "style":
            print(json.dumps(client.create_style(args.audio, args.motion, args.template, args.name), indent=2))
        else:
            motion = client.animate(args.audio, args.style, args.template, out=args.out)
            shapes = {k: list(v.shape) for k, v in motion.items() if hasattr(v, "shape") and v.ndim}
            print(f"wrote {args.out}: {shapes} at {float(motion['fps']):g} fps")
            if args.preview:
                client.animate(args.audio, args.style, args.template, fmt="mp4", out=args.preview)
                print(f"wrote {args.preview}")
    except ServiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
