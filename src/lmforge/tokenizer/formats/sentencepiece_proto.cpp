// Protobuf wire format (https://protobuf.dev/programming-guides/encoding/): each field is a varint
// key (number << 3 | wire type) and a value: 0 varint, 1 fixed 8 bytes, 2 length-prefixed bytes,
// 5 fixed 4 bytes. Field numbers from sentencepiece_model.proto.
#include "lmforge/tokenizer/formats/sentencepiece_proto.h"

#include <cstring>

#include "lmforge/core/error.h"

namespace lmforge {

namespace {

class Reader {
 public:
  Reader(std::string_view data, const std::string& where) : data_(data), where_(where) {}
  bool done() const { return pos_ >= data_.size(); }

  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (done()) corrupt("a varint runs past the end");
      unsigned char c = data_[pos_++];
      v |= static_cast<uint64_t>(c & 0x7F) << shift;
      if (!(c & 0x80)) return v;
    }
    corrupt("a varint is longer than 10 bytes");
  }
  std::string_view bytes() {
    uint64_t n = varint();
    if (n > data_.size() - pos_) corrupt("a field runs past the end");
    std::string_view s = data_.substr(pos_, n);
    pos_ += n;
    return s;
  }
  float fixed32_float() {
    if (data_.size() - pos_ < 4) corrupt("a float runs past the end");
    uint32_t u = 0;
    for (int i = 0; i < 4; ++i)
      u |= static_cast<uint32_t>(static_cast<unsigned char>(data_[pos_ + i])) << (8 * i);
    pos_ += 4;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  void skip(int wire_type) {
    switch (wire_type) {
      case 0:
        varint();
        return;
      case 1:
        advance(8);
        return;
      case 2:
        bytes();
        return;
      case 5:
        advance(4);
        return;
      default:
        corrupt(fmt::format("wire type {} is not used by SentencePiece models", wire_type));
    }
  }
  [[noreturn]] void corrupt(const std::string& what) const {
    fail("{}: not a SentencePiece model ({} at byte {}); the file is corrupt", where_, what, pos_);
  }

 private:
  void advance(size_t n) {
    if (data_.size() - pos_ < n) corrupt("a field runs past the end");
    pos_ += n;
  }
  std::string_view data_;
  const std::string& where_;
  size_t pos_ = 0;
};

// Calls field(number, wire_type, reader) for each field of the message in `data`.
template <typename Field>
void for_each_field(std::string_view data, const std::string& where, Field field) {
  Reader r(data, where);
  while (!r.done()) {
    uint64_t key = r.varint();
    field(static_cast<int>(key >> 3), static_cast<int>(key & 7), r);
  }
}

}  // namespace

SentencePieceModel parse_sentencepiece_model(std::string_view bytes, const std::string& where) {
  SentencePieceModel m;
  bool has_trainer = false;
  for_each_field(bytes, where, [&](int number, int wire, Reader& r) {
    if (number == 1 && wire == 2) {  // repeated SentencePiece pieces
      SentencePieceModel::Piece p;
      for_each_field(r.bytes(), where, [&](int n, int w, Reader& pr) {
        if (n == 1 && w == 2)
          p.piece = pr.bytes();
        else if (n == 2 && w == 5)
          p.score = pr.fixed32_float();
        else if (n == 3 && w == 0)
          p.type = static_cast<int>(pr.varint());
        else
          pr.skip(w);
      });
      m.pieces.push_back(std::move(p));
    } else if (number == 2 && wire == 2) {  // TrainerSpec
      has_trainer = true;
      for_each_field(r.bytes(), where, [&](int n, int w, Reader& tr) {
        if (n == 3 && w == 0)
          m.model_type = static_cast<int>(tr.varint());
        else if (n == 24 && w == 0)
          m.treat_whitespace_as_suffix = tr.varint() != 0;
        else if (n == 35 && w == 0)
          m.byte_fallback = tr.varint() != 0;
        else if (n == 44 && w == 2)
          m.unk_surface = tr.bytes();
        else
          tr.skip(w);
      });
    } else if (number == 3 && wire == 2) {  // NormalizerSpec
      for_each_field(r.bytes(), where, [&](int n, int w, Reader& nr) {
        if (n == 1 && w == 2)
          m.normalizer_name = nr.bytes();
        else if (n == 2 && w == 2)
          m.precompiled_charsmap = nr.bytes();
        else if (n == 3 && w == 0)
          m.add_dummy_prefix = nr.varint() != 0;
        else if (n == 4 && w == 0)
          m.remove_extra_whitespaces = nr.varint() != 0;
        else if (n == 5 && w == 0)
          m.escape_whitespaces = nr.varint() != 0;
        else
          nr.skip(w);
      });
    } else {
      r.skip(wire);
    }
  });
  if (m.pieces.empty() || !has_trainer)
    fail("{}: not a SentencePiece model (no pieces or no trainer spec)", where);
  return m;
}

}  // namespace lmforge
