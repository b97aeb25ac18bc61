#!/bin/sh
# demo.Store+NAME: receive a file on stdin and keep it as NAME in the inbox
# directory ($DEMO_INBOX if set, else /tmp). The caller chooses the name only,
# never the directory: a name with "/" in it, or "." or "..", is refused.
# Without an argument the file is called "incoming".
set -eu

name=${QREXEC_SERVICE_ARGUMENT:-incoming}
case $name in
    */* | . | ..)
        echo "demo.Store: refusing file name '$name'" >&2
        exit 2
        ;;
esac
inbox=${DEMO_INBOX:-/tmp}

# Write into a fresh temporary file, then rename it into place: nobody ever
# sees half a file, and a symlink planted at the final name is replaced rather
# than followed.
partial=$(mktemp "$inbox/.demo.Store.XXXXXX")
trap 'rm -f -- "$partial"' EXIT
cat >"$partial"
chmod 0644 "$partial"
size=$(wc -c <"$partial")
mv -f -- "$partial" "$inbox/$name"
trap - EXIT

echo "stored $size bytes from ${QREXEC_REMOTE_DOMAIN:-dom0} as $inbox/$name"
