"""The g++ that MLX's CPU kernel builds run through once `jit.private_kernel_folder` put it on PATH.

Run as `python -I -S gxx.py REAL_GXX KERNEL_FOLDER ARGS...` (standalone: no imports from this
package) for shared-library builds. A build of one source in MLX's kernel folder gets
`-march=native`, and its source a unit-stride version of the innermost loop; any other build
runs unchanged.

MLX writes the loop of a non-contiguous ("strided") fused kernel as pointer bumps by strides
known only at run time, which GCC leaves scalar. Slices, transposes and per-channel broadcasts
(a depthwise conv's taps) all end up there, although their innermost axis usually has stride 1
for every input. The rewrite adds, in front of that loop, a copy of it indexed by the loop
counter, taken when every strided input has stride 1 on the innermost axis; GCC vectorizes it.
Sources that do not look as expected are compiled as they are.
"""

import os
import re
import sys

BUILT = "// built by fastvlm-mlx gxx.py, version 1"
MARK = "// fastvlm-mlx: unit-stride innermost loop"
_READ = re.compile(r"  (\w+) tmp_(\w+) = \*(\w+);")
_WRITE = re.compile(r"  \*(\w+)\+\+ = (tmp_\w+);")


def unit_stride_loop(source: str) -> str:
    """The kernel source with a vectorizable copy of its innermost loop, or unchanged."""
    found = re.search(r"void \w+_strided_(\d+)\(int\* shape, int64_t\*\* strides, void\*\* args\) \{", source)
    if found is None or MARK in source:
        return source
    d = int(found.group(1)) - 1
    lines = source.split("\n")
    header = f"  for (int i{d} = 0; i{d} < shape[{d}]; ++i{d}) {{"
    if lines.count(header) != 1 or "  }" not in lines[lines.index(header) :]:
        return source
    start = lines.index(header)
    end = lines.index("  }", start)
    body = lines[start + 1 : end]
    inputs, outputs, indexed = [], [], []
    for line in body:
        if (read := _READ.fullmatch(line)) and read.group(2) == read.group(3):
            inputs.append(read.group(3))
            indexed.append(f"  {read.group(1)} tmp_{read.group(2)} = {read.group(3)}[i{d}];")
        elif write := _WRITE.fullmatch(line):
            outputs.append(write.group(1))
            indexed.append(f"  {write.group(1)}[i{d}] = {write.group(2)};")
        elif re.fullmatch(rf"  (\w+) \+= \1_strides\[{d}\];", line):
            continue
        elif "*" in line.split("=", 1)[-1] or "_strides" in line or "++" in line:
            return source  # a read or write this rewrite does not know
        else:
            indexed.append(line)
    bumped = sorted(set(re.findall(rf"  (\w+) \+= \1_strides\[{d}\];", "\n".join(body))))
    if not inputs or not outputs or bumped != sorted(inputs):
        return source
    unit = " && ".join(f"{x}_strides[{d}] == 1" for x in inputs)
    fast = [MARK, f"  if ({unit}) {{", "#pragma GCC ivdep", header, *indexed, "  }"]
    fast += [f"  {p} += shape[{d}];" for p in inputs + outputs] + ["  } else {"]
    return "\n".join(lines[:start] + fast + lines[start : end + 1] + ["  }"] + lines[end + 1 :])


def main(real: str, folder: str, args: list[str]) -> None:
    sources = [a for a in args if a.endswith(".cpp")]
    mlx_kernel = len(sources) == 1 and os.path.dirname(os.path.abspath(sources[0])) == os.path.abspath(folder)
    if mlx_kernel:
        try:
            with open(sources[0]) as f:
                source = f.read()
            if not source.startswith(BUILT):
                with open(sources[0], "w") as f:
                    f.write(f"{BUILT}\n{unit_stride_loop(source)}")
        except OSError:
            pass  # compile what is there
    os.execv(real, [real, *(["-march=native"] if mlx_kernel else []), *args])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
