"""Example client of the talkmesh style service (see serve/README.md).

python serve/client.py --url http://127.0.0.1:8000 [--key tmk_...] info    # --key default: $TALKMESH_API_KEY
python serve/client.py style --audio ref.wav --motion ref_vertices.npy [--template template.npy] [--name alice]
python serve/client.py animate --audio speech.wav --style sty_... --out motion.npz [--preview preview.mp4]
python serve/client.py animate --audio speech.wav --emotion happy --intensity 0.5 --sample --seed 3   # DEEPTalk
"""

from __future__ import annotations

import argparse
import json
import sys

from talkmesh.serving.client import ServiceError, StyleClient


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--key", default=None, help="API key (default: $TALKMESH_API_KEY; none in development mode)")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="method, model version, fps, training speakers")
    s = sub.add_parser("style", help="adapt to a reference clip (~10 s of a new speaker)")
    s.add_argument("--audio", required=True)
    s.add_argument("--motion", required=True, help=".npy vertices (T, V, 3) or FLAME params (T, 53|56)")
    s.add_argument("--template", help=".npy (V, 3) neutral face")
    s.add_argument("--name", default="")
    s.add_argument("--source", choices=("audio", "expression"), help="the style's emotion from (DEEPTalk)")
    a = sub.add_parser("animate", help="animate speech in a style")
    a.add_argument("--audio", required=True)
    a.add_argument("--style", default="", help="style id, training speaker, or 'id:0.7,id2:0.3'")
    a.add_argument("--template", help=".npy (V, 3) neutral face (default: the style's)")
    a.add_argument("--out", default="motion.npz", help="motion file (.npz: every output + fps)")
    a.add_argument("--preview", help="also write a preview video (.mp4)")
    a.add_argument("--emotion", help="emotion label, e.g. happy (DEEPTalk)")
    a.add_argument("--intensity", type=float, help="of the emotion label, 0..1")
    a.add_argument("--emotion-audio", help="speech whose emotion drives the motion (DEEPTalk)")
    a.add_argument("--sample", action="store_true", default=None, help="sample instead of argmax (DEEPTalk)")
    a.add_argument("--temperature", type=float, help="code temperature when sampling (> 0)")
    a.add_argument("--seed", type=int, help="seed of the sampling (>= 0)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    client = StyleClient(args.url, api_key=args.key)
    try:
        if args.cmd == "info":
            print(json.dumps(client.info(), indent=2))
        elif args.cmd == "style":
            style = client.create_style(args.audio, args.motion, args.template, args.name, source=args.source)
            print(json.dumps(style, indent=2))
        else:
            options = {
                "emotion": args.emotion,
                "intensity": args.intensity,
                "emotion_audio": args.emotion_audio,
                "sample": args.sample,
                "temperature": args.temperature,
                "seed": args.seed,
            }
            motion = client.animate(args.audio, args.style, args.template, out=args.out, **options)
            shapes = {k: list(v.shape) for k, v in motion.items() if hasattr(v, "shape") and v.ndim}
            print(f"wrote {args.out}: {shapes} at {float(motion['fps']):g} fps")
            if args.preview:
                client.animate(args.audio, args.style, args.template, fmt="mp4", out=args.preview, **options)
                print(f"wrote {args.preview}")
    except ServiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
