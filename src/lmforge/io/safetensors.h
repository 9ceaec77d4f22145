// safetensors (https://huggingface.co/docs/safetensors): 8-byte little-endian header length N,
// N bytes of JSON {"name": {"dtype": "F32", "shape": [..], "data_offsets": [b, e]}, ...,
// "__metadata__": {str: str}}, then the raw little-endian data. Used for lmforge checkpoints,
// test fixtures and Hugging Face weights, single files or sharded sets
// (model-00001-of-00003.safetensors ... + model.safetensors.index.json).
//
//   SafetensorsWriter w; w.add("wte", tensor); w.metadata["step"] = "10"; w.write(path);
//   Safetensors f = Safetensors::open(path);   // mmap'ed; tensors borrow the mapping
//   Tensor t = f.get("wte");                   // as stored
//   Tensor u = f.load("wte", DType::kF32);     // owned, converted (bf16/f16/f32/f64)
//
//   write_safetensors_set(dir, {{"wte", tensor}, ...}, {{"format", "pt"}}, 2'000'000'000);
//   SafetensorsSet s = SafetensorsSet::open(dir);   // a file, an index, or a directory
//
// open() accepts exactly the files the reference implementation (the `safetensors` Rust crate,
// 0.8) accepts, and rejects everything else with an Error naming the file and the tensor; the
// rules are in docs/formats.md. Every dtype of the format is accepted by open(); get() and load()
// fail for the dtypes an lmforge Tensor cannot hold (e.g. F8_E4M3, I64).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "lmforge/core/tensor.h"

namespace lmforge {

class MappedFile;

class Safetensors {
 public:
  // What the header says about one tensor: any dtype of the format ("F8_E4M3", "I64", ...), any
  // rank, and its byte range within the data section.
  struct Info {
    std::string dtype;
    std::vector<uint64_t> shape;
    uint64_t begin = 0, end = 0;
  };

  // Maps and validates the file. Throws Error naming the file (and the tensor) for a missing or
  // unreadable file and for anything the format forbids.
  static Safetensors open(const std::string& path);
  // The same over bytes in memory (kept alive by `bytes`); `name` stands for the path in errors.
  static Safetensors from_bytes(std::shared_ptr<Storage> bytes, const std::string& name);

  bool has(const std::string& name) const { return index_.count(name) != 0; }
  // A view into the mapped file as stored (read-only; copy before modifying), or an aligned copy
  // when the data is not aligned to its element size. Throws if absent or if the dtype or rank is
  // one an lmforge Tensor cannot hold.
  Tensor get(const std::string& name) const;
  // An owned tensor converted to `want`: any of F64/F32/BF16/F16 to any other (rounding to
  // nearest even, IEEE subnormals/inf/NaN kept); other dtypes only to themselves.
  Tensor load(const std::string& name, DType want) const;
  const Info& info(const std::string& name) const;  // throws if absent
  // For a file opened by open(): the tensor's pages leave this process's resident memory
  // (MappedFile::release) once its values are copied out; views of it stay valid (read again
  // from the file). Nothing for bytes in memory.
  void release(const std::string& name) const;
  std::vector<std::string> names() const;  // in file (data offset) order
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::string& path() const { return path_; }

 private:
  struct Entry {
    Info info;
    int kind;  // index into the format's dtype table
  };
  const Entry& entry(const std::string& name) const;

  std::string path_;
  std::shared_ptr<Storage> map_;      // the whole file
  std::shared_ptr<MappedFile> file_;  // its mapping (open()), or null (from_bytes)
  size_t data_start_ = 0;
  std::map<std::string, Entry> index_;
  std::vector<std::string> order_;
  std::map<std::string, std::string> metadata_;
};

class SafetensorsWriter {
 public:
  // Keeps a reference (data read at write()); a GPU tensor is copied to the host here.
  void add(const std::string& name, const Tensor& t);
  // A tensor made when write() reaches it, its bytes written and the tensor released: `make`
  // returns it (on the host) with this dtype and shape. A file of such tensors is written
  // holding one of them at a time.
  void add(const std::string& name, DType dtype, const Shape& shape, std::function<Tensor()> make);
  std::map<std::string, std::string> metadata;
  // Writes to a temporary beside path (AtomicFile) then renames: a reader never sees a
  // half-written file. Tensors are stored in the order added. Throws Error for a duplicate or
  // reserved name.
  void write(const std::string& path) const;

 private:
  struct Entry {
    std::string name;
    Tensor t;  // (undefined: made by `make`)
    DType dtype;
    Shape shape;
    std::function<Tensor()> make;
  };
  std::vector<Entry> tensors_;
};

// A model's weights as Hugging Face stores them: one `model.safetensors`, or shards
// `model-00001-of-0000N.safetensors` listed by `model.safetensors.index.json`
// ({"metadata": {"total_size": N}, "weight_map": {tensor: shard file}}).
class SafetensorsSet {
 public:
  // `path`: a .safetensors file, an index .json file, or a directory holding model.safetensors
  // (preferred, as Hugging Face does) or model.safetensors.index.json. Opens every shard; throws
  // Error naming the index or shard and the tensor for a missing shard file or a tensor the index
  // lists but its shard lacks. Tensors a shard holds but the index does not list are ignored.
  static SafetensorsSet open(const std::string& path);

  bool has(const std::string& name) const { return where_.count(name) != 0; }
  Tensor get(const std::string& name) const;  // as Safetensors::get
  Tensor load(const std::string& name, DType want) const;
  void release(const std::string& name) const;  // as Safetensors::release
  const Safetensors::Info& info(const std::string& name) const;
  std::vector<std::string> names() const;  // by shard, then in file order
  // The __metadata__ of the single file, or of the first shard.
  const std::map<std::string, std::string>& metadata() const;
  const std::string& path() const { return path_; }  // the file or index opened
  const std::vector<Safetensors>& files() const { return files_; }

 private:
  const Safetensors& file_of(const std::string& name) const;

  std::string path_;
  std::vector<Safetensors> files_;
  std::map<std::string, size_t> where_;  // tensor -> index into files_
};

// Hugging Face's default shard size (transformers' save_pretrained, max_shard_size="5GB").
inline constexpr uint64_t kSafetensorsShardBytes = 5'000'000'000;

// Writes `tensors` (in this order) into `dir` (created if needed) as Hugging Face does: a single
// model.safetensors when their bytes total at most max_shard_bytes, else shards split as
// huggingface_hub.split_torch_state_dict_into_shards splits them (a tensor larger than the limit
// gets a shard of its own) plus model.safetensors.index.json (total_size: the sum of tensor bytes).
// Every shard carries `metadata`. Each file is written atomically and files of the other layout
// (or stale shards) are removed afterwards; the set as a whole is not atomic, so write into a fresh
// directory when readers may be looking. Returns the files written, relative to `dir`.
std::vector<std::string> write_safetensors_set(
    const std::string& dir, const std::vector<std::pair<std::string, Tensor>>& tensors,
    const std::map<std::string, std::string>& metadata = {},
    uint64_t max_shard_bytes = kSafetensorsShardBytes);

}  // namespace lmforge
