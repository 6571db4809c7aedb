#include "io/tokenizer.hpp"

#include <algorithm>
#include <array>
#include <unordered_map>

#include "io/atomic_file.hpp"
#include "io/json_util.hpp"
#include "io/llama3_pretokenizer.hpp"
#include "io/utf8.hpp"
#include "src/common/error.hpp"

namespace longtune {

using jsonutil::json;

namespace {

// Heterogeneous lookup: find(std::string_view) on maps keyed by std::string, without a copy.
struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
template <class V>
using StringMap = std::unordered_map<std::string, V, StringHash, std::equal_to<>>;

// GPT-2's byte <-> printable character mapping of the ByteLevel pre-tokenizer: printable Latin-1
// bytes stand for themselves, the other 68 take U+0100, U+0101, ... in byte order.
struct ByteLevelAlphabet {
  std::array<uint32_t, 256> byte_to_cp{};
  std::array<int16_t, 512> cp_to_byte{};  // -1: not a byte character
  ByteLevelAlphabet() {
    cp_to_byte.fill(-1);
    uint32_t extra = 0;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
      byte_to_cp[b] = printable ? b : 256 + extra++;
      cp_to_byte[byte_to_cp[b]] = int16_t(b);
    }
  }
};
const ByteLevelAlphabet& alphabet() {
  static const ByteLevelAlphabet a;
  return a;
}

// The bytes a byte-level token string stands for; nullopt when a character is not one of the 256.
std::optional<std::string> token_bytes(std::string_view token) {
  std::string out;
  out.reserve(token.size());
  const auto* p = reinterpret_cast<const unsigned char*>(token.data());
  for (size_t i = 0; i < token.size();) {
    const size_t len = utf8_sequence_length(token, i);
    if (len == 0) return std::nullopt;
    const uint32_t cp = utf8_decode(p + i, len);
    if (cp >= 512 || alphabet().cp_to_byte[cp] < 0) return std::nullopt;
    out.push_back(char(alphabet().cp_to_byte[cp]));
    i += len;
  }
  return out;
}

struct AddedToken {
  std::string content;
  int32_t id = 0;
  bool special = false;
  bool normalized = false;
};

// Leftmost-longest matching of a set of added tokens (the tokenizers library's Aho-Corasick
// with MatchKind::LeftmostLongest gives the same matches).
class AddedMatcher {
 public:
  void add(const AddedToken* t) {
    auto& bucket = by_first_byte_[static_cast<unsigned char>(t->content[0])];
    bucket.push_back(t);
    std::stable_sort(bucket.begin(), bucket.end(),
                     [](const AddedToken* a, const AddedToken* b) { return a->content.size() > b->content.size(); });
    any_ = true;
  }
  bool empty() const { return !any_; }
  // First match at or after `from`: its token, and its position in *pos.
  const AddedToken* find(std::string_view text, size_t from, bool allow_special, size_t* pos) const {
    for (size_t i = from; i < text.size(); ++i) {
      const auto& bucket = by_first_byte_[static_cast<unsigned char>(text[i])];
      for (const AddedToken* t : bucket) {  // longest first
        if (t->special && !allow_special) continue;
        if (text.compare(i, t->content.size(), t->content) == 0) {
          *pos = i;
          return t;
        }
      }
    }
    return nullptr;
  }

 private:
  std::array<std::vector<const AddedToken*>, 256> by_first_byte_{};
  bool any_ = false;
};

struct MergeValue {
  int32_t rank;
  int32_t id;
};
uint64_t pair_key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }

// ---- tokenizer.json access with field-named errors ---------------------------------------------

struct Reader {
  const std::string& file;

  [[noreturn]] void fail(const std::string& field, const std::string& expected, const std::string& got) const {
    throw InputError(file, field, expected, got);
  }
  const json& member(const json& obj, const std::string& path, const char* key, const char* expected) const {
    const std::string field = path.empty() ? key : path + "." + key;
    if (!obj.is_object()) fail(path, "an object", jsonutil::describe(obj));
    const auto it = obj.find(key);
    if (it == obj.end()) fail(field, expected, "missing");
    return *it;
  }
  // An optional member; nullptr when absent or null.
  const json* optional(const json& obj, const char* key) const {
    const auto it = obj.find(key);
    return it == obj.end() || it->is_null() ? nullptr : &*it;
  }
  std::string string(const json& v, const std::string& field) const {
    if (!v.is_string()) fail(field, "a string", jsonutil::describe(v));
    return v.get<std::string>();
  }
  bool boolean(const json& obj, const std::string& path, const char* key, bool fallback) const {
    const json* v = optional(obj, key);
    if (!v) return fallback;
    if (!v->is_boolean()) fail(path + "." + key, "true or false", jsonutil::describe(*v));
    return v->get<bool>();
  }
  int32_t id(const json& v, const std::string& field) const {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > INT32_MAX)
      fail(field, "a token id (integer in [0, 2^31))", jsonutil::describe(v));
    return int32_t(v.get<int64_t>());
  }
  // A member that must be absent, null, or equal to one of the accepted values.
  void require_default(const json& obj, const std::string& path, const char* key, const json& accepted,
                       const char* expected) const {
    const json* v = optional(obj, key);
    if (v && *v != accepted) fail(path + "." + key, expected, jsonutil::describe(*v));
  }
};

}  // namespace

struct Tokenizer::Impl {
  std::string path;
  StringMap<int32_t> vocab;            // token bytes -> id (byte-level tokens of the model)
  std::vector<std::string> id_bytes;   // id -> bytes it decodes to
  std::vector<uint8_t> id_kind;        // 0 unused, 1 model token, 2 added token, 3 special added token
  std::array<int32_t, 256> byte_id{};  // id of each single-byte token
  std::unordered_map<uint64_t, MergeValue> merges;
  bool ignore_merges = false;
  std::vector<AddedToken> added;
  AddedMatcher non_normalized, normalized;  // the library matches the first set, then the second

  void set_id(int32_t id, std::string bytes, uint8_t kind) {
    if (size_t(id) >= id_bytes.size()) {
      id_bytes.resize(size_t(id) + 1);
      id_kind.resize(size_t(id) + 1, 0);
    }
    id_bytes[size_t(id)] = std::move(bytes);
    id_kind[size_t(id)] = kind;
  }

  void parse_model(const Reader& r, const json& root);
  void parse_pipeline(const Reader& r, const json& root) const;
  void parse_added(const Reader& r, const json& root);
};

void Tokenizer::Impl::parse_pipeline(const Reader& r, const json& root) const {
  if (const json* n = r.optional(root, "normalizer"))
    r.fail("normalizer", "null (longtune's tokenizer supports no normalizer)", jsonutil::describe(*n));

  const json& pre = r.member(root, "", "pre_tokenizer", "the Llama 3 pre-tokenizer (Sequence of Split and ByteLevel)");
  const std::string want_pre = "a Sequence of Split (Llama 3 regex) and ByteLevel";
  if (!pre.is_object() || r.string(r.member(pre, "pre_tokenizer", "type", "a string"), "pre_tokenizer.type") != "Sequence")
    r.fail("pre_tokenizer", want_pre, jsonutil::describe(pre));
  const json& seq = r.member(pre, "pre_tokenizer", "pretokenizers", "an array");
  if (!seq.is_array() || seq.size() != 2) r.fail("pre_tokenizer.pretokenizers", want_pre, jsonutil::describe(seq));
  const json& split = seq[0];
  const std::string sp = "pre_tokenizer.pretokenizers[0]";
  if (r.string(r.member(split, sp, "type", "\"Split\""), sp + ".type") != "Split")
    r.fail(sp + ".type", "\"Split\"", jsonutil::describe(split["type"]));
  const json& pattern = r.member(split, sp, "pattern", "{\"Regex\": <Llama 3 pattern>}");
  const json* regex = pattern.is_object() ? r.optional(pattern, "Regex") : nullptr;
  if (!regex || !regex->is_string() || regex->get<std::string>() != kLlama3Pattern)
    r.fail(sp + ".pattern", std::string("the Llama 3 regex ") + kLlama3Pattern, jsonutil::describe(pattern));
  if (r.string(r.member(split, sp, "behavior", "\"Isolated\""), sp + ".behavior") != "Isolated")
    r.fail(sp + ".behavior", "\"Isolated\"", jsonutil::describe(split["behavior"]));
  if (r.boolean(split, sp, "invert", false)) r.fail(sp + ".invert", "false", "true");
  const json& bl = seq[1];
  const std::string bp = "pre_tokenizer.pretokenizers[1]";
  if (r.string(r.member(bl, bp, "type", "\"ByteLevel\""), bp + ".type") != "ByteLevel")
    r.fail(bp + ".type", "\"ByteLevel\"", jsonutil::describe(bl["type"]));
  if (r.boolean(bl, bp, "add_prefix_space", true)) r.fail(bp + ".add_prefix_space", "false", "true");
  if (r.boolean(bl, bp, "use_regex", true)) r.fail(bp + ".use_regex", "false (the Split before it does the splitting)", "true");

  const json& dec = r.member(root, "", "decoder", "a ByteLevel decoder");
  if (!dec.is_object() || r.string(r.member(dec, "decoder", "type", "\"ByteLevel\""), "decoder.type") != "ByteLevel")
    r.fail("decoder", "a ByteLevel decoder", jsonutil::describe(dec));
}

void Tokenizer::Impl::parse_model(const Reader& r, const json& root) {
  const json& model = r.member(root, "", "model", "a BPE model object");
  const std::string type = r.string(r.member(model, "model", "type", "\"BPE\""), "model.type");
  if (type != "BPE") r.fail("model.type", "\"BPE\" (the only model longtune supports)", jsonutil::describe(model["type"]));
  r.require_default(model, "model", "dropout", json(0.0), "null (no BPE dropout)");
  r.require_default(model, "model", "continuing_subword_prefix", json(""), "null");
  r.require_default(model, "model", "end_of_word_suffix", json(""), "null");
  r.require_default(model, "model", "byte_fallback", json(false), "false");
  ignore_merges = r.boolean(model, "model", "ignore_merges", false);

  const json& v = r.member(model, "model", "vocab", "an object {token: id}");
  if (!v.is_object()) r.fail("model.vocab", "an object {token: id}", jsonutil::describe(v));
  StringMap<int32_t> by_text;  // token text as written -> id, for resolving merges
  by_text.reserve(v.size());
  vocab.reserve(v.size());
  for (const auto& [text, idv] : v.items()) {
    const int32_t id = r.id(idv, "model.vocab[\"" + text + "\"]");
    by_text.emplace(text, id);
    std::optional<std::string> bytes = token_bytes(text);
    if (bytes) vocab.emplace(*bytes, id);
    set_id(id, bytes ? *bytes : text, 1);
  }
  byte_id.fill(-1);
  for (uint32_t b = 0; b < 256; ++b) {
    const auto it = vocab.find(std::string_view(reinterpret_cast<const char*>(&b), 1));
    if (it == vocab.end()) {
      std::string ch;
      utf8_append(ch, alphabet().byte_to_cp[b]);
      r.fail("model.vocab", "all 256 byte-level characters (a byte-level BPE)",
             "no token \"" + ch + "\" for byte " + std::to_string(b));
    }
    byte_id[b] = it->second;
  }

  const json& m = r.member(model, "model", "merges", "an array of merges (\"a b\" or [\"a\", \"b\"])");
  if (!m.is_array()) r.fail("model.merges", "an array of merges (\"a b\" or [\"a\", \"b\"])", jsonutil::describe(m));
  merges.reserve(m.size());
  for (size_t i = 0; i < m.size(); ++i) {
    const std::string field = "model.merges[" + std::to_string(i) + "]";
    std::string a, b;
    const json& e = m[i];
    if (e.is_string()) {
      const std::string s = e.get<std::string>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        r.fail(field, "\"a b\" (two tokens separated by one space)", jsonutil::describe(e));
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
      a = e[0].get<std::string>();
      b = e[1].get<std::string>();
    } else {
      r.fail(field, "\"a b\" or [\"a\", \"b\"]", jsonutil::describe(e));
    }
    const auto ia = by_text.find(a), ib = by_text.find(b), iab = by_text.find(a + b);
    if (ia == by_text.end() || ib == by_text.end() || iab == by_text.end())
      r.fail(field, "tokens of model.vocab (both parts and their concatenation)",
             "\"" + (ia == by_text.end() ? a : ib == by_text.end() ? b : a + b) + "\" is not in the vocabulary");
    merges[pair_key(ia->second, ib->second)] = MergeValue{int32_t(i), iab->second};  // later wins, as in tokenizers
  }
}

void Tokenizer::Impl::parse_added(const Reader& r, const json& root) {
  const json* list = r.optional(root, "added_tokens");
  if (!list) return;
  if (!list->is_array()) r.fail("added_tokens", "an array", jsonutil::describe(*list));
  added.reserve(list->size());  // the matchers keep pointers into it
  for (size_t i = 0; i < list->size(); ++i) {
    const json& t = (*list)[i];
    const std::string f = "added_tokens[" + std::to_string(i) + "]";
    AddedToken a;
    a.id = r.id(r.member(t, f, "id", "a token id"), f + ".id");
    a.content = r.string(r.member(t, f, "content", "a string"), f + ".content");
    if (a.content.empty()) r.fail(f + ".content", "a non-empty string", "\"\"");
    if (!utf8_valid(a.content)) r.fail(f + ".content", "valid UTF-8", "invalid bytes");
    a.special = r.boolean(t, f, "special", false);
    a.normalized = r.boolean(t, f, "normalized", !a.special);
    for (const char* opt : {"single_word", "lstrip", "rstrip"})
      if (r.boolean(t, f, opt, false)) r.fail(f + "." + opt, "false (not supported)", "true");
    std::optional<std::string> bytes = token_bytes(a.content);
    set_id(a.id, bytes ? *bytes : a.content, a.special ? 3 : 2);
    added.push_back(std::move(a));
  }
  for (const AddedToken& a : added) (a.normalized ? normalized : non_normalized).add(&a);
}

// ---- Tokenizer -----------------------------------------------------------------------------------

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::load(const std::string& path) { return parse(read_text_file(path), path); }

Tokenizer Tokenizer::parse(const std::string& json_text, const std::string& file) {
  auto impl = std::make_unique<Impl>();
  impl->path = file;
  const json root = jsonutil::parse(json_text, file);
  const Reader r{file};
  if (!root.is_object()) r.fail("json", "a tokenizer.json object", jsonutil::describe(root));
  impl->parse_model(r, root);
  impl->parse_pipeline(r, root);
  impl->parse_added(r, root);
  return Tokenizer(std::move(impl));
}

int64_t Tokenizer::vocab_size() const { return int64_t(impl_->id_bytes.size()); }
const std::string& Tokenizer::path() const { return impl_->path; }

bool Tokenizer::added_token_contains(std::string_view s) const {
  for (const AddedToken& a : impl_->added)
    if (a.content.find(s) != std::string::npos) return true;
  return false;
}

std::optional<int32_t> Tokenizer::token_id(std::string_view text) const {
  for (const AddedToken& a : impl_->added)
    if (a.content == text) return a.id;
  const auto it = impl_->vocab.find(text);
  if (it != impl_->vocab.end()) return it->second;
  return std::nullopt;
}

int32_t Tokenizer::require_token(std::string_view text) const {
  const auto id = token_id(text);
  if (!id) throw InputError(impl_->path, "added_tokens", "a token \"" + std::string(text) + "\"", "none");
  return *id;
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool allow_special) const {
  std::vector<int32_t> out;
  TokenizerSession(*this).encode(text, allow_special, out);
  return out;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special) const {
  std::string bytes;
  for (const int32_t id : ids) {
    if (id < 0 || size_t(id) >= impl_->id_bytes.size() || impl_->id_kind[size_t(id)] == 0)
      throw InputError(impl_->path, "decode", "token ids of this tokenizer", "id " + std::to_string(id));
    if (skip_special && impl_->id_kind[size_t(id)] == 3) continue;
    bytes += impl_->id_bytes[size_t(id)];
  }
  std::string repaired;
  const std::string_view text = utf8_repair(bytes, repaired);
  return text.data() == bytes.data() ? bytes : repaired;
}

// ---- TokenizerSession ----------------------------------------------------------------------------

namespace {
struct Symbol {
  int32_t id, prev, next, len;
};
struct Candidate {
  int32_t rank, pos, id;
};
// std heap functions build a max-heap: "greater" puts the lowest rank, then the leftmost, on top.
bool after(const Candidate& a, const Candidate& b) { return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos; }

// Cache bounds: dropped wholesale when exceeded (hit rates recover within a few MB of text).
constexpr size_t kCacheEntries = size_t(1) << 18;
constexpr size_t kCachePool = size_t(1) << 22;
// Pre-tokens longer than this are not cached (rare, and would crowd the pool).
constexpr size_t kCacheMaxPiece = 256;
}  // namespace

struct TokenizerSession::State {
  Llama3PreTokenizer pre;
  std::vector<uint32_t> ends;
  std::string repaired;
  StringMap<std::pair<uint32_t, uint32_t>> cache;  // pre-token bytes -> (offset, count) in pool
  std::vector<int32_t> pool;
  std::vector<Symbol> syms;
  std::vector<Candidate> heap;
};

TokenizerSession::TokenizerSession(const Tokenizer& tokenizer)
    : tok_(tokenizer.impl_.get()), st_(std::make_unique<State>()) {}
TokenizerSession::TokenizerSession(TokenizerSession&&) noexcept = default;
TokenizerSession::~TokenizerSession() = default;

namespace {

// Byte-pair merges of one pre-token, exactly as the tokenizers library's Word::merge_all does
// them: lowest rank first, leftmost among equal ranks.
void bpe(const Tokenizer::Impl& t, std::string_view piece, std::vector<Symbol>& syms, std::vector<Candidate>& heap,
         std::vector<int32_t>& out) {
  if (t.ignore_merges) {
    const auto it = t.vocab.find(piece);
    if (it != t.vocab.end()) {
      out.push_back(it->second);
      return;
    }
  }
  const int32_t n = int32_t(piece.size());
  syms.clear();
  heap.clear();
  for (int32_t i = 0; i < n; ++i)
    syms.push_back(Symbol{t.byte_id[static_cast<unsigned char>(piece[size_t(i)])], i - 1, i + 1 < n ? i + 1 : -1, 1});
  auto merge_of = [&](int32_t a, int32_t b) -> const MergeValue* {
    const auto it = t.merges.find(pair_key(a, b));
    return it == t.merges.end() ? nullptr : &it->second;
  };
  auto push = [&](int32_t pos) {
    const Symbol& s = syms[size_t(pos)];
    if (const MergeValue* m = merge_of(s.id, syms[size_t(s.next)].id)) {
      heap.push_back(Candidate{m->rank, pos, m->id});
      std::push_heap(heap.begin(), heap.end(), after);
    }
  };
  for (int32_t i = 0; i + 1 < n; ++i) push(i);
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), after);
    const Candidate top = heap.back();
    heap.pop_back();
    Symbol& s = syms[size_t(top.pos)];
    if (s.len == 0 || s.next < 0) continue;
    Symbol& right = syms[size_t(s.next)];
    const MergeValue* m = merge_of(s.id, right.id);
    if (!m || m->id != top.id) continue;  // stale: a neighbour was merged since
    s.id = top.id;
    s.len += right.len;
    right.len = 0;
    s.next = right.next;
    if (s.next >= 0) syms[size_t(s.next)].prev = top.pos;
    if (s.prev >= 0) push(s.prev);
    if (s.next >= 0) push(top.pos);
  }
  for (int32_t i = 0; i >= 0; i = syms[size_t(i)].next) out.push_back(syms[size_t(i)].id);
}

}  // namespace

void TokenizerSession::encode(std::string_view text, bool allow_special, std::vector<int32_t>& out) {
  const Tokenizer::Impl& t = *tok_;
  State& st = *st_;
  const std::string_view valid = utf8_repair(text, st.repaired);

  auto encode_plain = [&](std::string_view s) {
    st.pre.split(s, st.ends);
    uint32_t begin = 0;
    for (const uint32_t end : st.ends) {
      const std::string_view piece = s.substr(begin, end - begin);
      begin = end;
      if (piece.size() > kCacheMaxPiece) {
        bpe(t, piece, st.syms, st.heap, out);
        continue;
      }
      const auto hit = st.cache.find(piece);
      if (hit != st.cache.end()) {
        const int32_t* p = st.pool.data() + hit->second.first;
        out.insert(out.end(), p, p + hit->second.second);
        continue;
      }
      const size_t first = out.size();
      bpe(t, piece, st.syms, st.heap, out);
      if (st.cache.size() >= kCacheEntries || st.pool.size() >= kCachePool) {
        st.cache.clear();
        st.pool.clear();
      }
      st.cache.emplace(std::string(piece), std::make_pair(uint32_t(st.pool.size()), uint32_t(out.size() - first)));
      st.pool.insert(st.pool.end(), out.begin() + std::ptrdiff_t(first), out.end());
    }
  };
  // Added tokens split the text first (non-normalized ones, then normalized ones in the rest);
  // the pieces between them go through the pre-tokenizer and BPE.
  auto split_normalized = [&](std::string_view s) {
    if (t.normalized.empty()) return encode_plain(s);
    size_t from = 0, pos = 0;
    while (const AddedToken* a = t.normalized.find(s, from, allow_special, &pos)) {
      if (pos > from) encode_plain(s.substr(from, pos - from));
      out.push_back(a->id);
      from = pos + a->content.size();
    }
    if (from < s.size()) encode_plain(s.substr(from));
  };
  size_t from = 0, pos = 0;
  while (const AddedToken* a = t.non_normalized.empty() ? nullptr : t.non_normalized.find(valid, from, allow_special, &pos)) {
    if (pos > from) split_normalized(valid.substr(from, pos - from));
    out.push_back(a->id);
    from = pos + a->content.size();
  }
  if (from < valid.size()) split_normalized(valid.substr(from));
}

}  // namespace longtune
