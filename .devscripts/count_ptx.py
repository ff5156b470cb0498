"""Opcode histogram of each PTX function in a MOSAIC_GPU_DUMP_PTX log (argv[1])."""
import collections, re, sys
text = open(sys.argv[1], errors="replace").read()
for name, body in re.findall(r"\.entry\s+(\w+)\s*\((.*?)\n\}", text, re.S):
    ops = collections.Counter(m.group(1) for m in
                              re.finditer(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.:]*)", body, re.M))
    print(f"== {name} ({sum(ops.values())} instructions)")
    for op, n in ops.most_common(40):
        print(f"  {n:6d} {op}")
