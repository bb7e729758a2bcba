"""Greedy edge-coverage selection of a corpus under a file and byte budget.

usage: select.py CONTROL_FILE SEED_DIR OUT_DIR [MAX_FILES] [MAX_BYTES]
Seeds (files of SEED_DIR, matched by content) are always kept; then the file adding the most
not-yet-covered features (ties: smaller) is added until the budget or the features run out.
"""
import hashlib, os, shutil, sys

ctl, seed_dir, out = sys.argv[1:4]
max_files = int(sys.argv[4]) if len(sys.argv) > 4 else 200
max_bytes = int(sys.argv[5]) if len(sys.argv) > 5 else 1 << 20
lines = open(ctl).read().split("\n")
n = int(lines[0]); files = lines[2:2 + n]
feats = {}
for l in lines[2 + n:]:
    p = l.split()
    if p and p[0] == "FT":
        feats[int(p[1])] = set(map(int, p[2:]))
data = {i: open(files[i], "rb").read() for i in feats}
by_hash = {hashlib.sha1(d).hexdigest(): i for i, d in data.items()}
total = set().union(*feats.values())
covered, chosen, size = set(), [], 0
seeds = sorted(os.listdir(seed_dir))
for s in seeds:
    d = open(os.path.join(seed_dir, s), "rb").read()
    i = by_hash.get(hashlib.sha1(d).hexdigest())
    if i is not None:
        covered |= feats[i]
    size += len(d)
count = len(seeds)
rest = dict(feats)
while count < max_files:
    best = max(rest, key=lambda i: (len(rest[i] - covered), -len(data[i])), default=None)
    if best is None or not (rest[best] - covered):
        break
    if size + len(data[best]) > max_bytes:
        del rest[best]
        continue
    covered |= rest.pop(best)
    chosen.append(best); count += 1; size += len(data[best])
os.makedirs(out, exist_ok=True)
for s in seeds:
    shutil.copy(os.path.join(seed_dir, s), os.path.join(out, s))
for i in chosen:
    h = hashlib.sha1(data[i]).hexdigest()
    open(os.path.join(out, h), "wb").write(data[i])
print(f"{count} files, {size} bytes, {len(covered)}/{len(total)} features "
      f"({100 * len(covered) / len(total):.1f}%)")
