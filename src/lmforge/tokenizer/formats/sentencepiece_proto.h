// The parts of a SentencePiece model file (a ModelProto, sentencepiece_model.proto) that the
// Hugging Face export needs and libsentencepiece does not expose: each piece's type and score, the
// model type and the normalizer spec. A minimal protobuf wire-format reader; fields it does not
// name are skipped, absent ones keep the .proto defaults.
//
//   SentencePieceModel m = parse_sentencepiece_model(read_file("tokenizer.model"),
//   "tokenizer.model"); if (m.model_type == SentencePieceModel::kBpe) ...
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace lmforge {

struct SentencePieceModel {
  enum ModelType { kUnigram = 1, kBpe = 2, kWord = 3, kChar = 4 };
  enum PieceType {
    kNormal = 1,
    kUnknown = 2,
    kControl = 3,
    kUserDefined = 4,
    kUnused = 5,
    kByte = 6
  };
  struct Piece {
    std::string piece;
    float score = 0;
    int type = kNormal;
  };
  std::vector<Piece> pieces;  // id -> piece
  // TrainerSpec
  int model_type = kUnigram;
  bool byte_fallback = false;
  bool treat_whitespace_as_suffix = false;
  std::string unk_surface = " \xE2\x81\x87 ";  // what decode writes for <unk>: " ⁇ "
  // NormalizerSpec
  std::string normalizer_name;
  std::string precompiled_charsmap;  // empty for "identity"
  bool add_dummy_prefix = true;
  bool remove_extra_whitespaces = true;
  bool escape_whitespaces = true;
};

// Throws Error naming `where` when the bytes are not a ModelProto.
SentencePieceModel parse_sentencepiece_model(std::string_view bytes, const std::string& where);

}  // namespace lmforge
