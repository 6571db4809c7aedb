#include "src/data/prepare.hpp"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <exception>
#include <filesystem>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>

#include "io/atomic_file.hpp"
#include "io/llama3_pretokenizer.hpp"
#include "io/token_dataset.hpp"
#include "io/utf8.hpp"
#include "src/common/error.hpp"

namespace longtune {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

struct InputFile {
  std::string path;
  bool jsonl = false;
  uint64_t size = 0;
};

bool has_extension(const fs::path& p, std::initializer_list<const char*> exts) {
  const std::string e = p.extension().string();
  for (const char* x : exts)
    if (e == x) return true;
  return false;
}

std::vector<InputFile> expand_inputs(const PrepareOptions& opt) {
  if (opt.inputs.empty()) throw ConfigError("--input: expected one or more JSONL/text files or folders, got none");
  std::vector<InputFile> files;
  for (const std::string& in : opt.inputs) {
    std::error_code ec;
    const fs::file_status st = fs::status(in, ec);
    if (!fs::exists(st)) throw InputError(in, "--input", "an existing file or folder", "no such file or directory");
    if (fs::is_directory(st)) {
      std::vector<std::string> txt;
      for (const auto& e : fs::directory_iterator(in))
        if (e.is_regular_file() && has_extension(e.path(), {".txt"})) txt.push_back(e.path().string());
      if (txt.empty()) throw InputError(in, "--input", "a folder holding .txt files", "none in it");
      std::sort(txt.begin(), txt.end());
      for (const std::string& t : txt) files.push_back(InputFile{t, false, 0});
    } else {
      files.push_back(InputFile{in, has_extension(in, {".jsonl", ".json"}), 0});
    }
  }
  for (InputFile& f : files) {
    std::error_code ec;
    f.size = fs::file_size(f.path, ec);
    if (ec) throw IoError("stat(" + f.path + "): " + ec.message());
    if (!f.jsonl && opt.format == RecordFormat::kChat)
      throw ConfigError("--format chat: expected JSONL inputs (.jsonl or .json), got the text file " + f.path);
  }
  return files;
}

// A unit of work: one JSONL line, or a piece of a text file (a text document may span pieces).
struct Item {
  uint32_t file;
  int64_t line;  // 1-based for JSONL lines, 0 for text pieces
  size_t offset, length;  // in Batch::data
  bool jsonl, doc_begin, doc_end;
};

struct Batch {
  std::string data;
  std::vector<Item> items;
  uint64_t input_bytes_done = 0;  // input bytes consumed once this batch is written
};

// Where a text file may be cut without changing its tokens: just after a '\n' that a non-space
// follows (no pre-token of the Llama 3 regex runs from a newline into a non-space), or at a space
// between two ASCII letters ("word| word"). Returns 0 when [from, end) has no such place.
size_t safe_text_cut(const std::string& d, size_t from, size_t end) {
  auto letter = [](unsigned char c) { return (c | 0x20) >= 'a' && (c | 0x20) <= 'z'; };
  for (size_t p = end - 1; p > from; --p) {
    const auto c = static_cast<unsigned char>(d[p]);
    const auto prev = static_cast<unsigned char>(d[p - 1]);
    if (prev == '\n' && c > ' ' && c < 0x80) return p;
    if (c == ' ' && p + 1 < end && letter(prev) && letter(static_cast<unsigned char>(d[p + 1]))) return p;
  }
  return 0;
}

class InputReader {
 public:
  InputReader(const std::vector<InputFile>& files, size_t batch_bytes, bool text_cuts)
      : files_(files), target_(batch_bytes), text_cuts_(text_cuts) {}
  ~InputReader() {
    if (f_) std::fclose(f_);
  }

  // Fills the next batch; false when the input is exhausted.
  bool next(Batch& b) {
    b.data.clear();
    b.items.clear();
    b.data.swap(carry_);
    size_t done = 0;  // bytes of b.data already turned into items
    size_t scan = 0;  // where to look for the next newline
    while (done < target_) {
      if (!f_) {
        if (fi_ == files_.size()) break;
        f_ = std::fopen(files_[fi_].path.c_str(), "rb");
        if (!f_) throw IoError("fopen(" + files_[fi_].path + "): " + errno_text(errno));
        line_ = 0;
        doc_open_ = false;
        done = scan = b.data.size();
      }
      const InputFile& in = files_[fi_];
      const size_t old = b.data.size();
      b.data.resize(old + kBlock);
      const size_t n = std::fread(b.data.data() + old, 1, kBlock, f_);
      if (n < kBlock && std::ferror(f_)) throw IoError("fread(" + in.path + "): " + errno_text(errno));
      b.data.resize(old + n);
      consumed_ += n;
      const bool eof = n == 0;
      if (in.jsonl) {
        for (size_t nl; (nl = b.data.find('\n', scan)) != std::string::npos; scan = done = nl + 1)
          add(b, done, nl - done, true, true, true);
        scan = b.data.size();
        if (eof && done < b.data.size()) {  // a last line without '\n'
          add(b, done, b.data.size() - done, true, true, true);
          done = scan = b.data.size();
        }
      } else if (eof) {
        // The whole text (or its last piece); an empty file is still one document.
        add(b, done, b.data.size() - done, false, !doc_open_, true);
        done = scan = b.data.size();
      } else if (b.data.size() - done >= kTextPiece) {
        size_t cut = text_cuts_ ? safe_text_cut(b.data, done + kTextPiece / 2, b.data.size()) : 0;
        if (cut == 0 && b.data.size() - done >= kTextForcedCut) {
          // No safe place in 64 MB: cut at a character boundary (may change a token or two).
          cut = b.data.size();
          while (cut > done && (static_cast<unsigned char>(b.data[cut - 1]) & 0xC0) == 0x80) --cut;
          if (cut > done) --cut;
        }
        if (cut > done) {
          add(b, done, cut - done, false, !doc_open_, false);
          doc_open_ = true;
          done = scan = cut;
        }
      }
      if (eof) {
        std::fclose(f_);
        f_ = nullptr;
        ++fi_;
      }
    }
    carry_.assign(b.data, done, std::string::npos);
    b.data.resize(done);
    b.input_bytes_done = consumed_ - carry_.size();
    return !b.items.empty();
  }

 private:
  static constexpr size_t kBlock = size_t(1) << 20;
  static constexpr size_t kTextPiece = size_t(4) << 20;
  static constexpr size_t kTextForcedCut = size_t(64) << 20;

  void add(Batch& b, size_t off, size_t len, bool jsonl, bool begin, bool end) {
    if (jsonl) ++line_;
    b.items.push_back(Item{uint32_t(fi_), jsonl ? line_ : 0, off, len, jsonl, begin, end});
  }

  const std::vector<InputFile>& files_;
  size_t target_;
  bool text_cuts_;
  size_t fi_ = 0;
  FILE* f_ = nullptr;
  int64_t line_ = 0;
  bool doc_open_ = false;
  std::string carry_;
  uint64_t consumed_ = 0;
};

struct ItemResult {
  std::vector<int32_t> ids;
  std::vector<uint8_t> mask;
  bool bad = false;
  RecordProblem problem;
};

// Tokenizes batches on `threads` worker threads; each keeps its own tokenizer session (cache).
class Workers {
 public:
  Workers(const Tokenizer& tok, const PrepareOptions& opt, const Llama3ChatTokens& special)
      : opt_(opt), special_(special) {
    for (int i = 0; i < opt.threads; ++i) sessions_.emplace_back(tok);
  }
  ~Workers() {  // on an error elsewhere: let the threads finish, keep the first error
    for (std::thread& t : threads_) t.join();
  }

  void start(const Batch& b, std::vector<ItemResult>& results) {
    results.resize(b.items.size());
    next_ = 0;
    error_ = nullptr;
    for (size_t t = 0; t < sessions_.size(); ++t)
      threads_.emplace_back([this, &b, &results, t] {
        try {
          Record rec;
          for (;;) {
            const size_t first = next_.fetch_add(kGrain);
            if (first >= b.items.size()) break;
            for (size_t i = first; i < std::min(first + kGrain, b.items.size()); ++i)
              process(sessions_[t], rec, b, b.items[i], results[i]);
          }
        } catch (...) {
          std::lock_guard<std::mutex> lock(mu_);
          if (!error_) error_ = std::current_exception();
        }
      });
  }
  void wait() {
    for (std::thread& t : threads_) t.join();
    threads_.clear();
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  }

 private:
  static constexpr size_t kGrain = 8;

  void process(TokenizerSession& s, Record& rec, const Batch& b, const Item& it, ItemResult& r) const {
    r.ids.clear();
    r.mask.clear();
    r.bad = false;
    const std::string_view text(b.data.data() + it.offset, it.length);
    if (it.jsonl) {
      if (!parse_record(text, opt_.format, opt_.loss_mask == LossMaskMode::kAssistant, &rec, &r.problem)) {
        r.bad = true;
        return;
      }
      if (rec.kind == RecordKind::kChat) {
        render_llama3_chat(s, special_, rec.messages, opt_.loss_mask, r.ids, r.mask);
        return;
      }
      r.ids.push_back(special_.begin_of_text);
      s.encode(rec.text, false, r.ids);
      r.ids.push_back(special_.end_of_text);
    } else {
      if (it.doc_begin) r.ids.push_back(special_.begin_of_text);
      s.encode(text, false, r.ids);
      if (it.doc_end) r.ids.push_back(special_.end_of_text);
    }
    r.mask.assign(r.ids.size(), 1);
  }

  const PrepareOptions& opt_;
  const Llama3ChatTokens& special_;
  std::vector<TokenizerSession> sessions_;
  std::vector<std::thread> threads_;
  std::atomic<size_t> next_{0};
  std::mutex mu_;
  std::exception_ptr error_;
};

std::string human_bytes(double b) {
  char buf[32];
  if (b >= 1e9) std::snprintf(buf, sizeof buf, "%.2f GB", b / 1e9);
  else if (b >= 1e6) std::snprintf(buf, sizeof buf, "%.1f MB", b / 1e6);
  else std::snprintf(buf, sizeof buf, "%.1f kB", b / 1e3);
  return buf;
}

class Progress {
 public:
  Progress(FILE* log, uint64_t total, double every_s)
      : log_(log), tty_(log && ::isatty(::fileno(log))), total_(total), every_(tty_ ? 0.25 : every_s),
        start_(Clock::now()), last_(start_) {}
  void update(uint64_t done, int64_t docs, bool final = false) {
    if (!log_) return;
    const auto now = Clock::now();
    if (!final && std::chrono::duration<double>(now - last_).count() < every_) return;
    last_ = now;
    const double secs = std::max(1e-9, std::chrono::duration<double>(now - start_).count());
    std::fprintf(log_, "%s[prepare] %s / %s (%3.0f%%)  %.1f MB/s  %lld documents%s", tty_ ? "\r" : "",
                 human_bytes(double(done)).c_str(), human_bytes(double(total_)).c_str(),
                 total_ ? 100.0 * double(done) / double(total_) : 100.0, double(done) / 1e6 / secs, (long long)docs,
                 tty_ && !final ? "   " : "\n");
    std::fflush(log_);
  }

 private:
  FILE* log_;
  bool tty_;
  uint64_t total_;
  double every_;
  Clock::time_point start_, last_;
};

}  // namespace

PrepareStats prepare_dataset(const PrepareOptions& opt) {
  const auto t0 = Clock::now();
  if (opt.threads < 1) throw ConfigError("--threads: expected an integer >= 1, got " + std::to_string(opt.threads));
  if (opt.max_tokens < 0) throw ConfigError("--max-tokens: expected 0 (no limit) or a positive integer");
  if (opt.out.empty()) throw ConfigError("--out: expected the path of the HDF5 dataset to write");
  if (opt.tokenizer.empty()) throw ConfigError("--tokenizer: expected a tokenizer.json (e.g. the model directory's)");
  {
    std::error_code ec;
    if (fs::exists(opt.out, ec) && !opt.force)
      throw InputError(opt.out, "--out", "a path that does not exist yet (or --force to replace it)", "an existing file");
    const fs::path parent = fs::path(opt.out).parent_path();
    if (!parent.empty() && !fs::is_directory(parent, ec))
      throw InputError(opt.out, "--out", "a path in an existing folder", "no folder " + parent.string());
  }
  const std::vector<InputFile> files = expand_inputs(opt);
  const Tokenizer tok = Tokenizer::load(opt.tokenizer);
  const Llama3ChatTokens special(tok);

  PrepareStats st;
  uint64_t total = 0;
  for (const InputFile& f : files) total += f.size;
  TokenDatasetWriter writer(opt.out, tok.vocab_size(), special.begin_of_text, special.end_of_text, true);
  // Text files are cut at spaces and newlines; an added token containing one would make that unsafe.
  InputReader reader(files, opt.batch_bytes, !tok.added_token_contains(" ") && !tok.added_token_contains("\n"));
  Workers workers(tok, opt, special);
  Progress progress(opt.log, total, opt.progress_every_s);

  int64_t doc_len = 0;
  bool doc_truncated = false;
  auto write = [&](const Batch& b, const std::vector<ItemResult>& results) {
    for (size_t i = 0; i < b.items.size(); ++i) {
      const Item& it = b.items[i];
      const ItemResult& r = results[i];
      if (r.bad) {
        const std::string where = files[it.file].path + ":" + std::to_string(it.line);
        if (opt.fail_on_bad_line) throw InputError(where, r.problem.field, r.problem.expected, r.problem.got);
        const std::string msg = where + ": " + r.problem.text();
        if (st.bad_line_messages.size() < opt.max_reported_bad_lines) {
          st.bad_line_messages.push_back(msg);
          if (opt.log) std::fprintf(opt.log, "[prepare] skipped %s\n", msg.c_str());
        }
        ++st.bad_lines;
        continue;
      }
      if (it.doc_begin) {
        doc_len = 0;
        doc_truncated = false;
      }
      size_t take = r.ids.size();
      if (opt.max_tokens > 0 && doc_len + int64_t(take) > opt.max_tokens) {
        take = size_t(opt.max_tokens - doc_len);
        doc_truncated = true;
      }
      writer.append(std::span(r.ids.data(), take), std::span(r.mask.data(), take));
      doc_len += int64_t(take);
      st.masked_tokens += std::count(r.mask.begin(), r.mask.begin() + std::ptrdiff_t(take), uint8_t(1));
      if (it.doc_end) {
        writer.end_document();
        ++st.documents;
        st.truncated_documents += doc_truncated;
        int b2 = 0;
        while (b2 < 63 && (int64_t(1) << (b2 + 1)) <= doc_len) ++b2;
        ++st.length_histogram[size_t(b2)];
      }
    }
    progress.update(b.input_bytes_done, st.documents);
  };

  // Two batches in flight: workers tokenize one while this thread reads the next and writes the
  // previous one's results.
  Batch cur, nxt;
  std::vector<ItemResult> res_cur, res_nxt;
  bool have = reader.next(cur);
  if (have) workers.start(cur, res_cur);
  while (have) {
    const bool have_next = reader.next(nxt);
    workers.wait();
    if (have_next) {
      std::swap(cur, nxt);
      std::swap(res_cur, res_nxt);
      workers.start(cur, res_cur);
      write(nxt, res_nxt);  // the batch before
    } else {
      write(cur, res_cur);
    }
    have = have_next;
  }
  st.tokens = writer.num_tokens();
  st.input_bytes = total;
  if (st.documents == 0)
    throw InputError(files.front().path, "--input", "at least one valid record",
                     "none" + (st.bad_lines ? " (" + std::to_string(st.bad_lines) + " bad lines)" : std::string()));
  writer.commit();
  st.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  progress.update(total, st.documents, true);
  return st;
}

std::string prepare_summary(const PrepareStats& s) {
  char buf[256];
  std::string out;
  std::snprintf(buf, sizeof buf,
                "[prepare] %lld documents, %lld tokens (%.1f%% masked in as targets), %lld truncated, %lld bad lines\n",
                (long long)s.documents, (long long)s.tokens,
                s.tokens ? 100.0 * double(s.masked_tokens) / double(s.tokens) : 0.0, (long long)s.truncated_documents,
                (long long)s.bad_lines);
  out += buf;
  std::snprintf(buf, sizeof buf, "[prepare] %s in %.1f s: %.1f MB/s\n", human_bytes(double(s.input_bytes)).c_str(),
                s.seconds, double(s.input_bytes) / 1e6 / std::max(s.seconds, 1e-9));
  out += buf;
  out += "[prepare] document lengths (tokens):\n";
  for (size_t b = 0; b < s.length_histogram.size(); ++b) {
    if (!s.length_histogram[b]) continue;
    std::snprintf(buf, sizeof buf, "[prepare]   [%lld, %lld)  %lld\n", (long long)(int64_t(1) << b),
                  (long long)(int64_t(1) << (b + 1)), (long long)s.length_histogram[b]);
    out += buf;
  }
  return out;
}

}  // namespace longtune
