"""``python -m gateway.app.vapid [--config F]``: make the Web Push VAPID key if missing, print its public key."""

from __future__ import annotations

from gateway.delivery.webpush import application_server_key, load_vapid


def main(argv: list[str] | None = None) -> int:
    """``python -m gateway.app.vapid [--config F]``: make the VAPID key if missing, print the public key."""
    import argparse

    from gateway.app.config import load_settings

    parser = argparse.ArgumentParser(prog="python -m gateway.app.vapid",
                                     description="Ensure a VAPID key pair and print its applicationServerKey.")
    parser.add_argument("--config", help="gateway.toml (default: built-in settings)")
    parser.add_argument("--data-dir", help="where the key is kept when [webpush] vapid_private_key is empty")
    args = parser.parse_args(argv)
    settings = load_settings(args.config)
    vapid = load_vapid(settings.webpush, args.data_dir or settings.data_dir)
    print(application_server_key(vapid))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
