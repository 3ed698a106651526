"""Service flags several end-to-end tests share."""

# Router flags: prefill every prompt on a prefill worker (however short, however long the
# prefill pool's queue), for tests of the remote prefill path itself.
ALWAYS_REMOTE = (
    "--min-remote-prefill-tokens", "1",
    "--min-remote-prefill-fraction", "0",
    "--max-remote-prefill-extra-wait-s", "inf",
)  # fmt: skip
