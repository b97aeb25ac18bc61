#!/bin/sh
# demo.Sign: a split-secret "vault". The secret below exists only inside the
# vault VM. A caller sends data on stdin and gets back sha256(secret || data)
# in hex: a tag it can hand on and have checked by the vault later, without
# ever holding the secret itself. A toy construction for the demo; a real
# vault would use an HMAC or a signing key (as split-GPG does).
set -eu

secret='demo vault secret - never leaves the vault'

{ printf '%s' "$secret"; cat; } | sha256sum | cut -d ' ' -f 1
