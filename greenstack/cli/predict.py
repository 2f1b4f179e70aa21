"""`greenstack predict RUN_DIR --text T`: classify texts with a finished text run's saved model."""

from __future__ import annotations

import argparse


def predict(argv: list[str]) -> int:
    """Classify texts with a finished text run's model/ (as documented for from_pretrained)."""
    import json

    from greenstack.inference import predict_text

    parser = argparse.ArgumentParser(prog="greenstack predict",
                                     description="classify texts with a text run's saved model and class names")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished text run (holds labels.json and model/)")
    parser.add_argument("--text", action="append", required=True, help="a text to classify (repeat for more)")
    parser.add_argument("--json", action="store_true", help="one JSON object per text instead of a table")
    args = parser.parse_args(argv)
    rows = predict_text(args.run_dir, args.text)
    for row in rows:
        print(json.dumps(row) if args.json else f"{row['label']}\t{row['score']:.3f}\t{row['text']}")
    return 0
