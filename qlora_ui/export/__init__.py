"""Take a trained run out of the app: a merged 16-bit model folder, a GGUF for llama.cpp / Ollama, a Modelfile.

    converter.py  llama.cpp's convert_hf_to_gguf.py, fetched once (`make install`), and the architectures it knows
    merge.py      the adapter merged into 16-bit weights (dequantized NF4 or the original base)
    gguf.py       llama.cpp's converter (f16 / q8_0) and quantizer (q4_k_m), each in a child process
    modelfile.py  the Ollama Modelfile (TEMPLATE from the model's chat template) and the run commands
    write.py      `export_run`: one export, written under a temporary name and renamed; a run's finished exports
    job.py        `ExportJobs`: exports in a background thread for the app

Every name is re-exported here, so `from qlora_ui.export import export_run` and `qlora_ui.export.ggufs` keep working.
"""

import shutil  # noqa: F401 - tests patch `export.shutil.disk_usage` (the shutil module itself)

from ..errors import ExportError
from .converter import (
    CONVERTER_FILES,
    LLAMA_CPP_VERSION,
    check_architecture,
    converter_dir,
    converter_script,
    fetch_converter,
    supported_architectures,
)
from .gguf import GGUF_QUANTS, LLAMA_FTYPES, QUANTIZE_CODE, _require_llama_cpp, convert_to_gguf, quantize_gguf
from .job import ExportJob, ExportJobs
from .merge import DEFAULT_MERGE_INTO, MERGE_INTO, _sixteen_bit, dequantized_weights, merge_model, require_adapter
from .modelfile import (
    TurnFormat,
    _go_quote,
    check_modelfile_text,
    modelfile_path,
    ollama_modelfile,
    ollama_template,
    run_commands,
    turn_format,
)
from .write import (
    FORMATS,
    ExportResult,
    Progress,
    _disk_error,
    _place,
    _save_merged,
    _staging,
    check_free_space,
    default_out,
    download_dir,
    export_run,
    exports,
    ggufs,
    served_download,
    weights_bytes,
    zip_folder,
)

__all__ = (
    "CONVERTER_FILES", "DEFAULT_MERGE_INTO", "ExportError", "ExportJob", "ExportJobs", "ExportResult", "FORMATS",
    "GGUF_QUANTS", "LLAMA_CPP_VERSION", "LLAMA_FTYPES", "MERGE_INTO", "Progress", "QUANTIZE_CODE", "TurnFormat",
    "_disk_error", "_go_quote", "_place", "_require_llama_cpp", "_save_merged", "_sixteen_bit", "_staging",
    "check_architecture", "check_free_space", "check_modelfile_text", "convert_to_gguf", "converter_dir",
    "converter_script", "default_out", "dequantized_weights", "download_dir", "export_run", "exports",
    "fetch_converter", "ggufs", "merge_model", "modelfile_path", "ollama_modelfile", "ollama_template",
    "quantize_gguf", "require_adapter", "run_commands", "served_download", "supported_architectures", "turn_format",
    "weights_bytes", "zip_folder",
)
