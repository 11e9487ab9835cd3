/* A native encoder for byte-level BPE with GPT-2's pre-tokenizer (Radford et al. 2019).

   The same ids as the Hugging Face `tokenizers` pipeline that gptkit.tokenizer.bpe builds
   (ByteLevel pre-tokenizer with GPT-2's regex, then BPE merges by rank) and as tiktoken's
   gpt2 encoding, at tiktoken's speed or better:

   1. a hand-written scanner splits the UTF-8 text exactly as the regex

          's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+

      does (leftmost-first alternation; `\s+(?!\S)` gives the last character of a
      whitespace run that precedes a non-space to the next piece);
   2. each piece's bytes are merged by rank, the lowest-ranked adjacent pair first and the
      leftmost of equal ranks, as tokenizers' BPE model does (a linear scan for short
      pieces, a heap for long ones);
   3. a per-encoder cache maps a piece's bytes to its ids, so a repeated word costs one hash
      lookup.

   \p{L}, \p{N} and \s are those of Unicode 16.0, the tables of the regex engines inside
   tokenizers 0.23 (Oniguruma) and tiktoken 0.14 (Rust regex): both agree on every code
   point. Python's own unicodedata may be older (3.11 has 14.0), so it cannot be the
   source; the ranges below were taken from tokenizers' pre-tokenizer code point by code
   point, and tests/test_fastbpe.py checks them against it again.

   Python API (gptkit.tokenizer._fastbpe):
       Encoder(byte_ids, merges, linear_max=64, cache_max=1 << 20)
           byte_ids: 256 native int32 (the id of each byte's single-byte token);
           merges: 3*m native int32, (left id, right id, merged id) in rank order;
           linear_max: the longest piece merged by linear scans rather than a heap;
           cache_max: how many pieces the cache holds before it starts over.
       Encoder.encode(text) -> list[int]   (UnicodeEncodeError on lone surrogates)
       Encoder.clear_cache(); Encoder.cache_len
       split(text) -> list[str]            the pre-tokenizer alone
       classes() -> bytes                  the class of every code point (0 other,
                                           1 letter, 2 number, 3 whitespace)
*/

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pythread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---- character classes ---------------------------------------------------------------- */

enum { C_OTHER = 0, C_LETTER = 1, C_NUMBER = 2, C_SPACE = 3 };

#define N_CODEPOINTS 0x110000
static uint8_t cp_class[N_CODEPOINTS];

/* White_Space: what \s matches in both engines. */
static const uint32_t SPACE_RANGES[][2] = {
    {0x9, 0xD}, {0x20, 0x20}, {0x85, 0x85}, {0xA0, 0xA0}, {0x1680, 0x1680},
    {0x2000, 0x200A}, {0x2028, 0x2029}, {0x202F, 0x202F}, {0x205F, 0x205F}, {0x3000, 0x3000},
};

/* \p{L} and \p{N} (general categories L* and N*), Unicode 16.0. */
static const uint32_t LETTER_RANGES[][2] = {
    {0x41, 0x5A}, {0x61, 0x7A}, {0xAA, 0xAA}, {0xB5, 0xB5}, {0xBA, 0xBA},
    {0xC0, 0xD6}, {0xD8, 0xF6}, {0xF8, 0x2C1}, {0x2C6, 0x2D1}, {0x2E0, 0x2E4},
    {0x2EC, 0x2EC}, {0x2EE, 0x2EE}, {0x370, 0x374}, {0x376, 0x377}, {0x37A, 0x37D},
    {0x37F, 0x37F}, {0x386, 0x386}, {0x388, 0x38A}, {0x38C, 0x38C}, {0x38E, 0x3A1},
    {0x3A3, 0x3F5}, {0x3F7, 0x481}, {0x48A, 0x52F}, {0x531, 0x556}, {0x559, 0x559},
    {0x560, 0x588}, {0x5D0, 0x5EA}, {0x5EF, 0x5F2}, {0x620, 0x64A}, {0x66E, 0x66F},
    {0x671, 0x6D3}, {0x6D5, 0x6D5}, {0x6E5, 0x6E6}, {0x6EE, 0x6EF}, {0x6FA, 0x6FC},
    {0x6FF, 0x6FF}, {0x710, 0x710}, {0x712, 0x72F}, {0x74D, 0x7A5}, {0x7B1, 0x7B1},
    {0x7CA, 0x7EA}, {0x7F4, 0x7F5}, {0x7FA, 0x7FA}, {0x800, 0x815}, {0x81A, 0x81A},
    {0x824, 0x824}, {0x828, 0x828}, {0x840, 0x858}, {0x860, 0x86A}, {0x870, 0x887},
    {0x889, 0x88E}, {0x8A0, 0x8C9}, {0x904, 0x939}, {0x93D, 0x93D}, {0x950, 0x950},
    {0x958, 0x961}, {0x971, 0x980}, {0x985, 0x98C}, {0x98F, 0x990}, {0x993, 0x9A8},
    {0x9AA, 0x9B0}, {0x9B2, 0x9B2}, {0x9B6, 0x9B9}, {0x9BD, 0x9BD}, {0x9CE, 0x9CE},
    {0x9DC, 0x9DD}, {0x9DF, 0x9E1}, {0x9F0, 0x9F1}, {0x9FC, 0x9FC}, {0xA05, 0xA0A},
    {0xA0F, 0xA10}, {0xA13, 0xA28}, {0xA2A, 0xA30}, {0xA32, 0xA33}, {0xA35, 0xA36},
    {0xA38, 0xA39}, {0xA59, 0xA5C}, {0xA5E, 0xA5E}, {0xA72, 0xA74}, {0xA85, 0xA8D},
    {0xA8F, 0xA91}, {0xA93, 0xAA8}, {0xAAA, 0xAB0}, {0xAB2, 0xAB3}, {0xAB5, 0xAB9},
    {0xABD, 0xABD}, {0xAD0, 0xAD0}, {0xAE0, 0xAE1}, {0xAF9, 0xAF9}, {0xB05, 0xB0C},
    {0xB0F, 0xB10}, {0xB13, 0xB28}, {0xB2A, 0xB30}, {0xB32, 0xB33}, {0xB35, 0xB39},
    {0xB3D, 0xB3D}, {0xB5C, 0xB5D}, {0xB5F, 0xB61}, {0xB71, 0xB71}, {0xB83, 0xB83},
    {0xB85, 0xB8A}, {0xB8E, 0xB90}, {0xB92, 0xB95}, {0xB99, 0xB9A}, {0xB9C, 0xB9C},
    {0xB9E, 0xB9F}, {0xBA3, 0xBA4}, {0xBA8, 0xBAA}, {0xBAE, 0xBB9}, {0xBD0, 0xBD0},
    {0xC05, 0xC0C}, {0xC0E, 0xC10}, {0xC12, 0xC28}, {0xC2A, 0xC39}, {0xC3D, 0xC3D},
    {0xC58, 0xC5A}, {0xC5D, 0xC5D}, {0xC60, 0xC61}, {0xC80, 0xC80}, {0xC85, 0xC8C},
    {0xC8E, 0xC90}, {0xC92, 0xCA8}, {0xCAA, 0xCB3}, {0xCB5, 0xCB9}, {0xCBD, 0xCBD},
    {0xCDD, 0xCDE}, {0xCE0, 0xCE1}, {0xCF1, 0xCF2}, {0xD04, 0xD0C}, {0xD0E, 0xD10},
    {0xD12, 0xD3A}, {0xD3D, 0xD3D}, {0xD4E, 0xD4E}, {0xD54, 0xD56}, {0xD5F, 0xD61},
    {0xD7A, 0xD7F}, {0xD85, 0xD96}, {0xD9A, 0xDB1}, {0xDB3, 0xDBB}, {0xDBD, 0xDBD},
    {0xDC0, 0xDC6}, {0xE01, 0xE30}, {0xE32, 0xE33}, {0xE40, 0xE46}, {0xE81, 0xE82},
    {0xE84, 0xE84}, {0xE86, 0xE8A}, {0xE8C, 0xEA3}, {0xEA5, 0xEA5}, {0xEA7, 0xEB0},
    {0xEB2, 0xEB3}, {0xEBD, 0xEBD}, {0xEC0, 0xEC4}, {0xEC6, 0xEC6}, {0xEDC, 0xEDF},
    {0xF00, 0xF00}, {0xF40, 0xF47}, {0xF49, 0xF6C}, {0xF88, 0xF8C}, {0x1000, 0x102A},
    {0x103F, 0x103F}, {0x1050, 0x1055}, {0x105A, 0x105D}, {0x1061, 0x1061}, {0x1065, 0x1066},
    {0x106E, 0x1070}, {0x1075, 0x1081}, {0x108E, 0x108E}, {0x10A0, 0x10C5}, {0x10C7, 0x10C7},
    {0x10CD, 0x10CD}, {0x10D0, 0x10FA}, {0x10FC, 0x1248}, {0x124A, 0x124D}, {0x1250, 0x1256},
    {0x1258, 0x1258}, {0x125A, 0x125D}, {0x1260, 0x1288}, {0x128A, 0x128D}, {0x1290, 0x12B0},
    {0x12B2, 0x12B5}, {0x12B8, 0x12BE}, {0x12C0, 0x12C0}, {0x12C2, 0x12C5}, {0x12C8, 0x12D6},
    {0x12D8, 0x1310}, {0x1312, 0x1315}, {0x1318, 0x135A}, {0x1380, 0x138F}, {0x13A0, 0x13F5},
    {0x13F8, 0x13FD}, {0x1401, 0x166C}, {0x166F, 0x167F}, {0x1681, 0x169A}, {0x16A0, 0x16EA},
    {0x16F1, 0x16F8}, {0x1700, 0x1711}, {0x171F, 0x1731}, {0x1740, 0x1751}, {0x1760, 0x176C},
    {0x176E, 0x1770}, {0x1780, 0x17B3}, {0x17D7, 0x17D7}, {0x17DC, 0x17DC}, {0x1820, 0x1878},
    {0x1880, 0x1884}, {0x1887, 0x18A8}, {0x18AA, 0x18AA}, {0x18B0, 0x18F5}, {0x1900, 0x191E},
    {0x1950, 0x196D}, {0x1970, 0x1974}, {0x1980, 0x19AB}, {0x19B0, 0x19C9}, {0x1A00, 0x1A16},
    {0x1A20, 0x1A54}, {0x1AA7, 0x1AA7}, {0x1B05, 0x1B33}, {0x1B45, 0x1B4C}, {0x1B83, 0x1BA0},
    {0x1BAE, 0x1BAF}, {0x1BBA, 0x1BE5}, {0x1C00, 0x1C23}, {0x1C4D, 0x1C4F}, {0x1C5A, 0x1C7D},
    {0x1C80, 0x1C8A}, {0x1C90, 0x1CBA}, {0x1CBD, 0x1CBF}, {0x1CE9, 0x1CEC}, {0x1CEE, 0x1CF3},
    {0x1CF5, 0x1CF6}, {0x1CFA, 0x1CFA}, {0x1D00, 0x1DBF}, {0x1E00, 0x1F15}, {0x1F18, 0x1F1D},
    {0x1F20, 0x1F45}, {0x1F48, 0x1F4D}, {0x1F50, 0x1F57}, {0x1F59, 0x1F59}, {0x1F5B, 0x1F5B},
    {0x1F5D, 0x1F5D}, {0x1F5F, 0x1F7D}, {0x1F80, 0x1FB4}, {0x1FB6, 0x1FBC}, {0x1FBE, 0x1FBE},
    {0x1FC2, 0x1FC4}, {0x1FC6, 0x1FCC}, {0x1FD0, 0x1FD3}, {0x1FD6, 0x1FDB}, {0x1FE0, 0x1FEC},
    {0x1FF2, 0x1FF4}, {0x1FF6, 0x1FFC}, {0x2071, 0x2071}, {0x207F, 0x207F}, {0x2090, 0x209C},
    {0x2102, 0x2102}, {0x2107, 0x2107}, {0x210A, 0x2113}, {0x2115, 0x2115}, {0x2119, 0x211D},
    {0x2124, 0x2124}, {0x2126, 0x2126}, {0x2128, 0x2128}, {0x212A, 0x212D}, {0x212F, 0x2139},
    {0x213C, 0x213F}, {0x2145, 0x2149}, {0x214E, 0x214E}, {0x2183, 0x2184}, {0x2C00, 0x2CE4},
    {0x2CEB, 0x2CEE}, {0x2CF2, 0x2CF3}, {0x2D00, 0x2D25}, {0x2D27, 0x2D27}, {0x2D2D, 0x2D2D},
    {0x2D30, 0x2D67}, {0x2D6F, 0x2D6F}, {0x2D80, 0x2D96}, {0x2DA0, 0x2DA6}, {0x2DA8, 0x2DAE},
    {0x2DB0, 0x2DB6}, {0x2DB8, 0x2DBE}, {0x2DC0, 0x2DC6}, {0x2DC8, 0x2DCE}, {0x2DD0, 0x2DD6},
    {0x2DD8, 0x2DDE}, {0x2E2F, 0x2E2F}, {0x3005, 0x3006}, {0x3031, 0x3035}, {0x303B, 0x303C},
    {0x3041, 0x3096}, {0x309D, 0x309F}, {0x30A1, 0x30FA}, {0x30FC, 0x30FF}, {0x3105, 0x312F},
    {0x3131, 0x318E}, {0x31A0, 0x31BF}, {0x31F0, 0x31FF}, {0x3400, 0x4DBF}, {0x4E00, 0xA48C},
    {0xA4D0, 0xA4FD}, {0xA500, 0xA60C}, {0xA610, 0xA61F}, {0xA62A, 0xA62B}, {0xA640, 0xA66E},
    {0xA67F, 0xA69D}, {0xA6A0, 0xA6E5}, {0xA717, 0xA71F}, {0xA722, 0xA788}, {0xA78B, 0xA7CD},
    {0xA7D0, 0xA7D1}, {0xA7D3, 0xA7D3}, {0xA7D5, 0xA7DC}, {0xA7F2, 0xA801}, {0xA803, 0xA805},
    {0xA807, 0xA80A}, {0xA80C, 0xA822}, {0xA840, 0xA873}, {0xA882, 0xA8B3}, {0xA8F2, 0xA8F7},
    {0xA8FB, 0xA8FB}, {0xA8FD, 0xA8FE}, {0xA90A, 0xA925}, {0xA930, 0xA946}, {0xA960, 0xA97C},
    {0xA984, 0xA9B2}, {0xA9CF, 0xA9CF}, {0xA9E0, 0xA9E4}, {0xA9E6, 0xA9EF}, {0xA9FA, 0xA9FE},
    {0xAA00, 0xAA28}, {0xAA40, 0xAA42}, {0xAA44, 0xAA4B}, {0xAA60, 0xAA76}, {0xAA7A, 0xAA7A},
    {0xAA7E, 0xAAAF}, {0xAAB1, 0xAAB1}, {0xAAB5, 0xAAB6}, {0xAAB9, 0xAABD}, {0xAAC0, 0xAAC0},
    {0xAAC2, 0xAAC2}, {0xAADB, 0xAADD}, {0xAAE0, 0xAAEA}, {0xAAF2, 0xAAF4}, {0xAB01, 0xAB06},
    {0xAB09, 0xAB0E}, {0xAB11, 0xAB16}, {0xAB20, 0xAB26}, {0xAB28, 0xAB2E}, {0xAB30, 0xAB5A},
    {0xAB5C, 0xAB69}, {0xAB70, 0xABE2}, {0xAC00, 0xD7A3}, {0xD7B0, 0xD7C6}, {0xD7CB, 0xD7FB},
    {0xF900, 0xFA6D}, {0xFA70, 0xFAD9}, {0xFB00, 0xFB06}, {0xFB13, 0xFB17}, {0xFB1D, 0xFB1D},
    {0xFB1F, 0xFB28}, {0xFB2A, 0xFB36}, {0xFB38, 0xFB3C}, {0xFB3E, 0xFB3E}, {0xFB40, 0xFB41},
    {0xFB43, 0xFB44}, {0xFB46, 0xFBB1}, {0xFBD3, 0xFD3D}, {0xFD50, 0xFD8F}, {0xFD92, 0xFDC7},
    {0xFDF0, 0xFDFB}, {0xFE70, 0xFE74}, {0xFE76, 0xFEFC}, {0xFF21, 0xFF3A}, {0xFF41, 0xFF5A},
    {0xFF66, 0xFFBE}, {0xFFC2, 0xFFC7}, {0xFFCA, 0xFFCF}, {0xFFD2, 0xFFD7}, {0xFFDA, 0xFFDC},
    {0x10000, 0x1000B}, {0x1000D, 0x10026}, {0x10028, 0x1003A}, {0x1003C, 0x1003D}, {0x1003F, 0x1004D},
    {0x10050, 0x1005D}, {0x10080, 0x100FA}, {0x10280, 0x1029C}, {0x102A0, 0x102D0}, {0x10300, 0x1031F},
    {0x1032D, 0x10340}, {0x10342, 0x10349}, {0x10350, 0x10375}, {0x10380, 0x1039D}, {0x103A0, 0x103C3},
    {0x103C8, 0x103CF}, {0x10400, 0x1049D}, {0x104B0, 0x104D3}, {0x104D8, 0x104FB}, {0x10500, 0x10527},
    {0x10530, 0x10563}, {0x10570, 0x1057A}, {0x1057C, 0x1058A}, {0x1058C, 0x10592}, {0x10594, 0x10595},
    {0x10597, 0x105A1}, {0x105A3, 0x105B1}, {0x105B3, 0x105B9}, {0x105BB, 0x105BC}, {0x105C0, 0x105F3},
    {0x10600, 0x10736}, {0x10740, 0x10755}, {0x10760, 0x10767}, {0x10780, 0x10785}, {0x10787, 0x107B0},
    {0x107B2, 0x107BA}, {0x10800, 0x10805}, {0x10808, 0x10808}, {0x1080A, 0x10835}, {0x10837, 0x10838},
    {0x1083C, 0x1083C}, {0x1083F, 0x10855}, {0x10860, 0x10876}, {0x10880, 0x1089E}, {0x108E0, 0x108F2},
    {0x108F4, 0x108F5}, {0x10900, 0x10915}, {0x10920, 0x10939}, {0x10980, 0x109B7}, {0x109BE, 0x109BF},
    {0x10A00, 0x10A00}, {0x10A10, 0x10A13}, {0x10A15, 0x10A17}, {0x10A19, 0x10A35}, {0x10A60, 0x10A7C},
    {0x10A80, 0x10A9C}, {0x10AC0, 0x10AC7}, {0x10AC9, 0x10AE4}, {0x10B00, 0x10B35}, {0x10B40, 0x10B55},
    {0x10B60, 0x10B72}, {0x10B80, 0x10B91}, {0x10C00, 0x10C48}, {0x10C80, 0x10CB2}, {0x10CC0, 0x10CF2},
    {0x10D00, 0x10D23}, {0x10D4A, 0x10D65}, {0x10D6F, 0x10D85}, {0x10E80, 0x10EA9}, {0x10EB0, 0x10EB1},
    {0x10EC2, 0x10EC4}, {0x10F00, 0x10F1C}, {0x10F27, 0x10F27}, {0x10F30, 0x10F45}, {0x10F70, 0x10F81},
    {0x10FB0, 0x10FC4}, {0x10FE0, 0x10FF6}, {0x11003, 0x11037}, {0x11071, 0x11072}, {0x11075, 0x11075},
    {0x11083, 0x110AF}, {0x110D0, 0x110E8}, {0x11103, 0x11126}, {0x11144, 0x11144}, {0x11147, 0x11147},
    {0x11150, 0x11172}, {0x11176, 0x11176}, {0x11183, 0x111B2}, {0x111C1, 0x111C4}, {0x111DA, 0x111DA},
    {0x111DC, 0x111DC}, {0x11200, 0x11211}, {0x11213, 0x1122B}, {0x1123F, 0x11240}, {0x11280, 0x11286},
    {0x11288, 0x11288}, {0x1128A, 0x1128D}, {0x1128F, 0x1129D}, {0x1129F, 0x112A8}, {0x112B0, 0x112DE},
    {0x11305, 0x1130C}, {0x1130F, 0x11310}, {0x11313, 0x11328}, {0x1132A, 0x11330}, {0x11332, 0x11333},
    {0x11335, 0x11339}, {0x1133D, 0x1133D}, {0x11350, 0x11350}, {0x1135D, 0x11361}, {0x11380, 0x11389},
    {0x1138B, 0x1138B}, {0x1138E, 0x1138E}, {0x11390, 0x113B5}, {0x113B7, 0x113B7}, {0x113D1, 0x113D1},
    {0x113D3, 0x113D3}, {0x11400, 0x11434}, {0x11447, 0x1144A}, {0x1145F, 0x11461}, {0x11480, 0x114AF},
    {0x114C4, 0x114C5}, {0x114C7, 0x114C7}, {0x11580, 0x115AE}, {0x115D8, 0x115DB}, {0x11600, 0x1162F},
    {0x11644, 0x11644}, {0x11680, 0x116AA}, {0x116B8, 0x116B8}, {0x11700, 0x1171A}, {0x11740, 0x11746},
    {0x11800, 0x1182B}, {0x118A0, 0x118DF}, {0x118FF, 0x11906}, {0x11909, 0x11909}, {0x1190C, 0x11913},
    {0x11915, 0x11916}, {0x11918, 0x1192F}, {0x1193F, 0x1193F}, {0x11941, 0x11941}, {0x119A0, 0x119A7},
    {0x119AA, 0x119D0}, {0x119E1, 0x119E1}, {0x119E3, 0x119E3}, {0x11A00, 0x11A00}, {0x11A0B, 0x11A32},
    {0x11A3A, 0x11A3A}, {0x11A50, 0x11A50}, {0x11A5C, 0x11A89}, {0x11A9D, 0x11A9D}, {0x11AB0, 0x11AF8},
    {0x11BC0, 0x11BE0}, {0x11C00, 0x11C08}, {0x11C0A, 0x11C2E}, {0x11C40, 0x11C40}, {0x11C72, 0x11C8F},
    {0x11D00, 0x11D06}, {0x11D08, 0x11D09}, {0x11D0B, 0x11D30}, {0x11D46, 0x11D46}, {0x11D60, 0x11D65},
    {0x11D67, 0x11D68}, {0x11D6A, 0x11D89}, {0x11D98, 0x11D98}, {0x11EE0, 0x11EF2}, {0x11F02, 0x11F02},
    {0x11F04, 0x11F10}, {0x11F12, 0x11F33}, {0x11FB0, 0x11FB0}, {0x12000, 0x12399}, {0x12480, 0x12543},
    {0x12F90, 0x12FF0}, {0x13000, 0x1342F}, {0x13441, 0x13446}, {0x13460, 0x143FA}, {0x14400, 0x14646},
    {0x16100, 0x1611D}, {0x16800, 0x16A38}, {0x16A40, 0x16A5E}, {0x16A70, 0x16ABE}, {0x16AD0, 0x16AED},
    {0x16B00, 0x16B2F}, {0x16B40, 0x16B43}, {0x16B63, 0x16B77}, {0x16B7D, 0x16B8F}, {0x16D40, 0x16D6C},
    {0x16E40, 0x16E7F}, {0x16F00, 0x16F4A}, {0x16F50, 0x16F50}, {0x16F93, 0x16F9F}, {0x16FE0, 0x16FE1},
    {0x16FE3, 0x16FE3}, {0x17000, 0x187F7}, {0x18800, 0x18CD5}, {0x18CFF, 0x18D08}, {0x1AFF0, 0x1AFF3},
    {0x1AFF5, 0x1AFFB}, {0x1AFFD, 0x1AFFE}, {0x1B000, 0x1B122}, {0x1B132, 0x1B132}, {0x1B150, 0x1B152},
    {0x1B155, 0x1B155}, {0x1B164, 0x1B167}, {0x1B170, 0x1B2FB}, {0x1BC00, 0x1BC6A}, {0x1BC70, 0x1BC7C},
    {0x1BC80, 0x1BC88}, {0x1BC90, 0x1BC99}, {0x1D400, 0x1D454}, {0x1D456, 0x1D49C}, {0x1D49E, 0x1D49F},
    {0x1D4A2, 0x1D4A2}, {0x1D4A5, 0x1D4A6}, {0x1D4A9, 0x1D4AC}, {0x1D4AE, 0x1D4B9}, {0x1D4BB, 0x1D4BB},
    {0x1D4BD, 0x1D4C3}, {0x1D4C5, 0x1D505}, {0x1D507, 0x1D50A}, {0x1D50D, 0x1D514}, {0x1D516, 0x1D51C},
    {0x1D51E, 0x1D539}, {0x1D53B, 0x1D53E}, {0x1D540, 0x1D544}, {0x1D546, 0x1D546}, {0x1D54A, 0x1D550},
    {0x1D552, 0x1D6A5}, {0x1D6A8, 0x1D6C0}, {0x1D6C2, 0x1D6DA}, {0x1D6DC, 0x1D6FA}, {0x1D6FC, 0x1D714},
    {0x1D716, 0x1D734}, {0x1D736, 0x1D74E}, {0x1D750, 0x1D76E}, {0x1D770, 0x1D788}, {0x1D78A, 0x1D7A8},
    {0x1D7AA, 0x1D7C2}, {0x1D7C4, 0x1D7CB}, {0x1DF00, 0x1DF1E}, {0x1DF25, 0x1DF2A}, {0x1E030, 0x1E06D},
    {0x1E100, 0x1E12C}, {0x1E137, 0x1E13D}, {0x1E14E, 0x1E14E}, {0x1E290, 0x1E2AD}, {0x1E2C0, 0x1E2EB},
    {0x1E4D0, 0x1E4EB}, {0x1E5D0, 0x1E5ED}, {0x1E5F0, 0x1E5F0}, {0x1E7E0, 0x1E7E6}, {0x1E7E8, 0x1E7EB},
    {0x1E7ED, 0x1E7EE}, {0x1E7F0, 0x1E7FE}, {0x1E800, 0x1E8C4}, {0x1E900, 0x1E943}, {0x1E94B, 0x1E94B},
    {0x1EE00, 0x1EE03}, {0x1EE05, 0x1EE1F}, {0x1EE21, 0x1EE22}, {0x1EE24, 0x1EE24}, {0x1EE27, 0x1EE27},
    {0x1EE29, 0x1EE32}, {0x1EE34, 0x1EE37}, {0x1EE39, 0x1EE39}, {0x1EE3B, 0x1EE3B}, {0x1EE42, 0x1EE42},
    {0x1EE47, 0x1EE47}, {0x1EE49, 0x1EE49}, {0x1EE4B, 0x1EE4B}, {0x1EE4D, 0x1EE4F}, {0x1EE51, 0x1EE52},
    {0x1EE54, 0x1EE54}, {0x1EE57, 0x1EE57}, {0x1EE59, 0x1EE59}, {0x1EE5B, 0x1EE5B}, {0x1EE5D, 0x1EE5D},
    {0x1EE5F, 0x1EE5F}, {0x1EE61, 0x1EE62}, {0x1EE64, 0x1EE64}, {0x1EE67, 0x1EE6A}, {0x1EE6C, 0x1EE72},
    {0x1EE74, 0x1EE77}, {0x1EE79, 0x1EE7C}, {0x1EE7E, 0x1EE7E}, {0x1EE80, 0x1EE89}, {0x1EE8B, 0x1EE9B},
    {0x1EEA1, 0x1EEA3}, {0x1EEA5, 0x1EEA9}, {0x1EEAB, 0x1EEBB}, {0x20000, 0x2A6DF}, {0x2A700, 0x2B739},
    {0x2B740, 0x2B81D}, {0x2B820, 0x2CEA1}, {0x2CEB0, 0x2EBE0}, {0x2EBF0, 0x2EE5D}, {0x2F800, 0x2FA1D},
    {0x30000, 0x3134A}, {0x31350, 0x323AF},
};

static const uint32_t NUMBER_RANGES[][2] = {
    {0x30, 0x39}, {0xB2, 0xB3}, {0xB9, 0xB9}, {0xBC, 0xBE}, {0x660, 0x669},
    {0x6F0, 0x6F9}, {0x7C0, 0x7C9}, {0x966, 0x96F}, {0x9E6, 0x9EF}, {0x9F4, 0x9F9},
    {0xA66, 0xA6F}, {0xAE6, 0xAEF}, {0xB66, 0xB6F}, {0xB72, 0xB77}, {0xBE6, 0xBF2},
    {0xC66, 0xC6F}, {0xC78, 0xC7E}, {0xCE6, 0xCEF}, {0xD58, 0xD5E}, {0xD66, 0xD78},
    {0xDE6, 0xDEF}, {0xE50, 0xE59}, {0xED0, 0xED9}, {0xF20, 0xF33}, {0x1040, 0x1049},
    {0x1090, 0x1099}, {0x1369, 0x137C}, {0x16EE, 0x16F0}, {0x17E0, 0x17E9}, {0x17F0, 0x17F9},
    {0x1810, 0x1819}, {0x1946, 0x194F}, {0x19D0, 0x19DA}, {0x1A80, 0x1A89}, {0x1A90, 0x1A99},
    {0x1B50, 0x1B59}, {0x1BB0, 0x1BB9}, {0x1C40, 0x1C49}, {0x1C50, 0x1C59}, {0x2070, 0x2070},
    {0x2074, 0x2079}, {0x2080, 0x2089}, {0x2150, 0x2182}, {0x2185, 0x2189}, {0x2460, 0x249B},
    {0x24EA, 0x24FF}, {0x2776, 0x2793}, {0x2CFD, 0x2CFD}, {0x3007, 0x3007}, {0x3021, 0x3029},
    {0x3038, 0x303A}, {0x3192, 0x3195}, {0x3220, 0x3229}, {0x3248, 0x324F}, {0x3251, 0x325F},
    {0x3280, 0x3289}, {0x32B1, 0x32BF}, {0xA620, 0xA629}, {0xA6E6, 0xA6EF}, {0xA830, 0xA835},
    {0xA8D0, 0xA8D9}, {0xA900, 0xA909}, {0xA9D0, 0xA9D9}, {0xA9F0, 0xA9F9}, {0xAA50, 0xAA59},
    {0xABF0, 0xABF9}, {0xFF10, 0xFF19}, {0x10107, 0x10133}, {0x10140, 0x10178}, {0x1018A, 0x1018B},
    {0x102E1, 0x102FB}, {0x10320, 0x10323}, {0x10341, 0x10341}, {0x1034A, 0x1034A}, {0x103D1, 0x103D5},
    {0x104A0, 0x104A9}, {0x10858, 0x1085F}, {0x10879, 0x1087F}, {0x108A7, 0x108AF}, {0x108FB, 0x108FF},
    {0x10916, 0x1091B}, {0x109BC, 0x109BD}, {0x109C0, 0x109CF}, {0x109D2, 0x109FF}, {0x10A40, 0x10A48},
    {0x10A7D, 0x10A7E}, {0x10A9D, 0x10A9F}, {0x10AEB, 0x10AEF}, {0x10B58, 0x10B5F}, {0x10B78, 0x10B7F},
    {0x10BA9, 0x10BAF}, {0x10CFA, 0x10CFF}, {0x10D30, 0x10D39}, {0x10D40, 0x10D49}, {0x10E60, 0x10E7E},
    {0x10F1D, 0x10F26}, {0x10F51, 0x10F54}, {0x10FC5, 0x10FCB}, {0x11052, 0x1106F}, {0x110F0, 0x110F9},
    {0x11136, 0x1113F}, {0x111D0, 0x111D9}, {0x111E1, 0x111F4}, {0x112F0, 0x112F9}, {0x11450, 0x11459},
    {0x114D0, 0x114D9}, {0x11650, 0x11659}, {0x116C0, 0x116C9}, {0x116D0, 0x116E3}, {0x11730, 0x1173B},
    {0x118E0, 0x118F2}, {0x11950, 0x11959}, {0x11BF0, 0x11BF9}, {0x11C50, 0x11C6C}, {0x11D50, 0x11D59},
    {0x11DA0, 0x11DA9}, {0x11F50, 0x11F59}, {0x11FC0, 0x11FD4}, {0x12400, 0x1246E}, {0x16130, 0x16139},
    {0x16A60, 0x16A69}, {0x16AC0, 0x16AC9}, {0x16B50, 0x16B59}, {0x16B5B, 0x16B61}, {0x16D70, 0x16D79},
    {0x16E80, 0x16E96}, {0x1CCF0, 0x1CCF9}, {0x1D2C0, 0x1D2D3}, {0x1D2E0, 0x1D2F3}, {0x1D360, 0x1D378},
    {0x1D7CE, 0x1D7FF}, {0x1E140, 0x1E149}, {0x1E2F0, 0x1E2F9}, {0x1E4F0, 0x1E4F9}, {0x1E5F1, 0x1E5FA},
    {0x1E8C7, 0x1E8CF}, {0x1E950, 0x1E959}, {0x1EC71, 0x1ECAB}, {0x1ECAD, 0x1ECAF}, {0x1ECB1, 0x1ECB4},
    {0x1ED01, 0x1ED2D}, {0x1ED2F, 0x1ED3D}, {0x1F100, 0x1F10C}, {0x1FBF0, 0x1FBF9},
};

#define N_RANGES(a) (sizeof(a) / sizeof((a)[0]))

static void
fill_ranges(const uint32_t (*ranges)[2], size_t n, uint8_t cls)
{
    for (size_t i = 0; i < n; i++)
        memset(cp_class + ranges[i][0], cls, ranges[i][1] - ranges[i][0] + 1);
}

static void
build_classes(void)
{
    memset(cp_class, C_OTHER, sizeof(cp_class));
    fill_ranges(LETTER_RANGES, N_RANGES(LETTER_RANGES), C_LETTER);
    fill_ranges(NUMBER_RANGES, N_RANGES(NUMBER_RANGES), C_NUMBER);
    fill_ranges(SPACE_RANGES, N_RANGES(SPACE_RANGES), C_SPACE);
}

/* The class of the character that starts at s[i] (valid UTF-8), and its length in bytes. */
static inline int
class_at(const uint8_t *s, Py_ssize_t i, Py_ssize_t *len)
{
    uint32_t c = s[i];
    if (c < 0x80) {
        *len = 1;
        return cp_class[c];
    }
    if (c < 0xE0) {
        *len = 2;
        c = ((c & 0x1F) << 6) | (s[i + 1] & 0x3F);
    }
    else if (c < 0xF0) {
        *len = 3;
        c = ((c & 0x0F) << 12) | ((uint32_t)(s[i + 1] & 0x3F) << 6) | (s[i + 2] & 0x3F);
    }
    else {
        *len = 4;
        c = ((c & 0x07) << 18) | ((uint32_t)(s[i + 1] & 0x3F) << 12) |
            ((uint32_t)(s[i + 2] & 0x3F) << 6) | (s[i + 3] & 0x3F);
        if (c >= N_CODEPOINTS) /* not from a valid str; keep the lookup in bounds */
            return C_OTHER;
    }
    return cp_class[c];
}

/* ---- the pre-tokenizer ------------------------------------------------------------------ */

/* Where the piece that starts at s[i] (i < n) ends: the regex's alternatives in order. */
static Py_ssize_t
piece_end(const uint8_t *s, Py_ssize_t n, Py_ssize_t i)
{
    uint8_t c = s[i];
    /* 's|'t|'re|'ve|'m|'ll|'d : lower-case ASCII only, whatever follows */
    if (c == '\'' && i + 1 < n) {
        uint8_t d = s[i + 1];
        if (d == 's' || d == 't' || d == 'm' || d == 'd')
            return i + 2;
        if (i + 2 < n) {
            uint8_t e = s[i + 2];
            if ((d == 'r' && e == 'e') || (d == 'v' && e == 'e') || (d == 'l' && e == 'l'))
                return i + 3;
        }
    }
    Py_ssize_t len, len2;
    int k = class_at(s, i, &len);
    Py_ssize_t j = i + len;
    /* ` ?X+`: a space joins a run of letters, numbers or others that follows it */
    if (c == ' ' && j < n) {
        int k2 = class_at(s, j, &len2);
        if (k2 != C_SPACE) {
            k = k2;
            j += len2;
        }
    }
    if (k != C_SPACE) {
        while (j < n && class_at(s, j, &len2) == k)
            j += len2;
        return j;
    }
    /* \s+(?!\S) | \s+ */
    Py_ssize_t last = i; /* where the run's last character starts */
    while (j < n && class_at(s, j, &len2) == C_SPACE) {
        last = j;
        j += len2;
    }
    if (j < n && last > i)
        return last; /* the last space goes with what follows */
    return j;
}

/* ---- merges: (left id, right id) -> (rank, merged id) ----------------------------------- */

#define EMPTY_KEY UINT64_MAX

typedef struct {
    uint64_t key;
    int32_t rank;
    int32_t id;
} MergeSlot;

/* When every id and rank fits in 16 bits (GPT-2: 50,257 ids, 50,000 merges), a slot packs
   into 8 bytes, (left << 48 | right << 32 | rank << 16 | merged id), and the table half the
   size stays in cache better. */
#define NARROW_LIMIT 0xFFFF
#define NARROW_EMPTY UINT64_MAX

static inline uint64_t
mix64(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

/* ---- the cache: piece bytes -> ids ------------------------------------------------------ */

typedef struct {
    uint32_t hash; /* the low half of the 64-bit hash */
    uint32_t key_off, val_off;
    uint16_t key_len, val_len; /* key_len 0: an empty slot */
} CacheSlot;

#define CACHE_MAX_PIECE 256          /* longer pieces are merged every time (< 65536) */
#define CACHE_MAX_ENTRIES (1u << 20) /* default; then the cache starts over */
#define CACHE_MAX_BYTES (64u << 20)

static inline uint64_t
hash_bytes(const uint8_t *p, size_t n)
{
    uint64_t h = 0x9E3779B97F4A7C15ULL * (n + 1);
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = (h ^ w) * 0xff51afd7ed558ccdULL;
        h ^= h >> 31;
        p += 8;
        n -= 8;
    }
    if (n) {
        uint64_t w = 0;
        for (size_t i = 0; i < n; i++)
            w |= (uint64_t)p[i] << (8 * i);
        h = (h ^ w) * 0xc4ceb9fe1a85ec53ULL;
    }
    return mix64(h);
}

/* Scratch space for merging one piece. */
typedef struct {
    int32_t *id, *rank, *nid; /* linear: symbols; the pair at i and the id it merges to */
    int32_t *prev, *next;      /* heap: a linked list of symbols */
    struct HeapItem *heap;
    size_t cap;
} Scratch;

typedef struct HeapItem {
    int32_t rank, pos, id;
} HeapItem;

static void
scratch_free(Scratch *w)
{
    free(w->id);
    free(w->rank);
    free(w->nid);
    free(w->prev);
    free(w->next);
    free(w->heap);
    memset(w, 0, sizeof(*w));
}

static int
scratch_reserve(Scratch *w, size_t n)
{
    if (n <= w->cap)
        return 0;
    size_t cap = w->cap ? w->cap : 256;
    while (cap < n)
        cap *= 2;
    int32_t *a = realloc(w->id, cap * sizeof(int32_t));
    if (a) w->id = a;
    int32_t *b = realloc(w->rank, cap * sizeof(int32_t));
    if (b) w->rank = b;
    int32_t *c = realloc(w->nid, cap * sizeof(int32_t));
    if (c) w->nid = c;
    int32_t *d = realloc(w->prev, cap * sizeof(int32_t));
    if (d) w->prev = d;
    int32_t *f = realloc(w->next, cap * sizeof(int32_t));
    if (f) w->next = f;
    HeapItem *h = realloc(w->heap, 2 * cap * sizeof(HeapItem));
    if (h) w->heap = h;
    if (!a || !b || !c || !d || !f || !h)
        return -1;
    w->cap = cap;
    return 0;
}

/* ---- the encoder object ----------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    int32_t byte_id[256];
    MergeSlot *merges; /* one of these two */
    uint64_t *narrow;
    uint64_t merge_mask;
    int merge_shift;
    int linear_max;
    size_t cache_max;
    /* cache */
    CacheSlot *slots;
    size_t cap, used;
    uint8_t *keys;
    size_t keys_len, keys_cap;
    int32_t *vals;
    size_t vals_len, vals_cap;
    /* one int object per id, so that building the result list allocates nothing */
    PyObject **ints;
    Py_ssize_t n_ints;
    Scratch work;            /* for merging one piece */
    PyThread_type_lock lock; /* guards the cache and work: one encode at a time */
} Encoder;

static inline int
merge_get(const Encoder *e, int32_t a, int32_t b, int32_t *rank, int32_t *id)
{
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    uint64_t h = (key * 0x9E3779B97F4A7C15ULL) >> e->merge_shift;
    if (e->narrow) {
        uint64_t want = ((uint64_t)(uint16_t)a << 16) | (uint16_t)b;
        for (;;) {
            uint64_t s = e->narrow[h];
            if ((s >> 32) == want) {
                *rank = (int32_t)((s >> 16) & 0xFFFF);
                *id = (int32_t)(s & 0xFFFF);
                return 1;
            }
            if (s == NARROW_EMPTY)
                return 0;
            h = (h + 1) & e->merge_mask;
        }
    }
    for (;;) {
        const MergeSlot *s = &e->merges[h];
        if (s->key == key) {
            *rank = s->rank;
            *id = s->id;
            return 1;
        }
        if (s->key == EMPTY_KEY)
            return 0;
        h = (h + 1) & e->merge_mask;
    }
}

/* A growable int32 buffer. */
typedef struct {
    int32_t *p;
    size_t len, cap;
} IdBuf;

static int
idbuf_reserve(IdBuf *b, size_t extra)
{
    if (b->len + extra <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->len + extra)
        cap *= 2;
    int32_t *p = realloc(b->p, cap * sizeof(int32_t));
    if (!p)
        return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

#define NO_RANK INT32_MAX

/* Short pieces: scan for the lowest rank, merge, update the two neighbouring pairs. The
   ids end in w->id; returns their count. */
static size_t
bpe_linear(const Encoder *e, const uint8_t *p, size_t n, Scratch *w)
{
    int32_t *id = w->id, *rank = w->rank, *nid = w->nid;
    for (size_t i = 0; i < n; i++)
        id[i] = e->byte_id[p[i]];
    for (size_t i = 0; i + 1 < n; i++)
        if (!merge_get(e, id[i], id[i + 1], &rank[i], &nid[i]))
            rank[i] = NO_RANK;
    size_t m = n;
    while (m > 1) {
        int32_t best = NO_RANK;
        size_t b = 0;
        for (size_t i = 0; i + 1 < m; i++)
            if (rank[i] < best) {
                best = rank[i];
                b = i;
            }
        if (best == NO_RANK)
            break;
        id[b] = nid[b];
        /* drop symbol b+1 and pair b+1 (it joined the old symbol b+1 to b+2) */
        memmove(id + b + 1, id + b + 2, (m - b - 2) * sizeof(int32_t));
        if (m - b > 2) {
            memmove(rank + b + 1, rank + b + 2, (m - b - 3) * sizeof(int32_t));
            memmove(nid + b + 1, nid + b + 2, (m - b - 3) * sizeof(int32_t));
        }
        m--;
        if (b + 1 < m && !merge_get(e, id[b], id[b + 1], &rank[b], &nid[b]))
            rank[b] = NO_RANK;
        if (b > 0 && !merge_get(e, id[b - 1], id[b], &rank[b - 1], &nid[b - 1]))
            rank[b - 1] = NO_RANK;
    }
    return m;
}

static inline int
heap_less(const HeapItem *a, const HeapItem *b)
{
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void
heap_push(HeapItem *h, size_t *n, HeapItem x)
{
    size_t i = (*n)++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!heap_less(&x, &h[parent]))
            break;
        h[i] = h[parent];
        i = parent;
    }
    h[i] = x;
}

static HeapItem
heap_pop(HeapItem *h, size_t *n)
{
    HeapItem top = h[0], x = h[--(*n)];
    size_t i = 0, m = *n;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= m)
            break;
        if (c + 1 < m && heap_less(&h[c + 1], &h[c]))
            c++;
        if (!heap_less(&h[c], &x))
            break;
        h[i] = h[c];
        i = c;
    }
    h[i] = x;
    return top;
}

/* Long pieces: the same order of merges (lowest rank, then leftmost) in O(n log n), with a
   heap of candidate pairs keyed by their left symbol's position; an entry whose pair has
   changed since it was pushed is skipped, as in tokenizers' Word::merge_all. */
static size_t
bpe_heap(const Encoder *e, const uint8_t *p, size_t n, Scratch *w)
{
    int32_t *id = w->id, *prev = w->prev, *next = w->next;
    HeapItem *heap = w->heap;
    size_t hn = 0;
    for (size_t i = 0; i < n; i++) {
        id[i] = e->byte_id[p[i]];
        prev[i] = (int32_t)i - 1;
        next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
    }
    int32_t rank, nid;
    for (size_t i = 0; i + 1 < n; i++)
        if (merge_get(e, id[i], id[i + 1], &rank, &nid))
            heap_push(heap, &hn, (HeapItem){rank, (int32_t)i, nid});
    while (hn > 0) {
        HeapItem top = heap_pop(heap, &hn);
        int32_t a = top.pos, b = next[a];
        if (id[a] < 0 || b < 0)
            continue;
        if (!merge_get(e, id[a], id[b], &rank, &nid) || nid != top.id)
            continue;
        id[a] = nid;
        id[b] = -1; /* removed */
        next[a] = next[b];
        if (next[b] >= 0)
            prev[next[b]] = a;
        if (prev[a] >= 0 && merge_get(e, id[prev[a]], id[a], &rank, &nid))
            heap_push(heap, &hn, (HeapItem){rank, prev[a], nid});
        if (next[a] >= 0 && merge_get(e, id[a], id[next[a]], &rank, &nid))
            heap_push(heap, &hn, (HeapItem){rank, a, nid});
    }
    size_t m = 0;
    for (int32_t i = 0; i >= 0; i = next[i])
        id[m++] = id[i];
    return m;
}

static void
cache_clear(Encoder *e)
{
    if (e->slots)
        memset(e->slots, 0, e->cap * sizeof(CacheSlot));
    e->used = 0;
    e->keys_len = 0;
    e->vals_len = 0;
}

static int
cache_grow(Encoder *e)
{
    size_t cap = e->cap ? e->cap * 2 : 4096;
    CacheSlot *slots = calloc(cap, sizeof(CacheSlot));
    if (!slots)
        return -1;
    for (size_t i = 0; i < e->cap; i++) {
        CacheSlot *s = &e->slots[i];
        if (!s->key_len)
            continue;
        size_t j = s->hash & (cap - 1);
        while (slots[j].key_len)
            j = (j + 1) & (cap - 1);
        slots[j] = *s;
    }
    free(e->slots);
    e->slots = slots;
    e->cap = cap;
    return 0;
}

/* Append the ids of one piece to out. Returns -1 when out of memory. */
static int
encode_piece(Encoder *e, const uint8_t *p, size_t n, IdBuf *out, Scratch *w)
{
    if (n == 1) {
        if (idbuf_reserve(out, 1) < 0)
            return -1;
        out->p[out->len++] = e->byte_id[p[0]];
        return 0;
    }
    int cacheable = n <= CACHE_MAX_PIECE;
    uint64_t h = 0;
    size_t slot = 0;
    if (cacheable) {
        h = hash_bytes(p, n);
        if (e->cap) {
            slot = h & (e->cap - 1);
            for (;;) {
                const CacheSlot *s = &e->slots[slot];
                if (!s->key_len)
                    break;
                if (s->hash == (uint32_t)h && s->key_len == n &&
                    memcmp(e->keys + s->key_off, p, n) == 0) {
                    if (idbuf_reserve(out, s->val_len) < 0)
                        return -1;
                    memcpy(out->p + out->len, e->vals + s->val_off, s->val_len * sizeof(int32_t));
                    out->len += s->val_len;
                    return 0;
                }
                slot = (slot + 1) & (e->cap - 1);
            }
        }
    }
    if (scratch_reserve(w, n) < 0)
        return -1;
    size_t m = n <= (size_t)e->linear_max ? bpe_linear(e, p, n, w) : bpe_heap(e, p, n, w);
    if (idbuf_reserve(out, m) < 0)
        return -1;
    memcpy(out->p + out->len, w->id, m * sizeof(int32_t));
    out->len += m;
    if (!cacheable)
        return 0;

    /* remember it */
    if (e->used >= e->cache_max || e->keys_len + n > CACHE_MAX_BYTES)
        cache_clear(e);
    if (e->keys_len + n > e->keys_cap) {
        size_t cap = e->keys_cap ? e->keys_cap : 1 << 16;
        while (cap < e->keys_len + n)
            cap *= 2;
        uint8_t *k = realloc(e->keys, cap);
        if (!k)
            return 0; /* the cache is an optimisation: skip it */
        e->keys = k;
        e->keys_cap = cap;
    }
    if (e->vals_len + m > e->vals_cap) {
        size_t cap = e->vals_cap ? e->vals_cap : 1 << 15;
        while (cap < e->vals_len + m)
            cap *= 2;
        int32_t *v = realloc(e->vals, cap * sizeof(int32_t));
        if (!v)
            return 0;
        e->vals = v;
        e->vals_cap = cap;
    }
    if (2 * (e->used + 1) > e->cap && cache_grow(e) < 0)
        return 0;
    slot = h & (e->cap - 1);
    while (e->slots[slot].key_len)
        slot = (slot + 1) & (e->cap - 1);
    CacheSlot *s = &e->slots[slot];
    s->hash = (uint32_t)h;
    s->key_off = (uint32_t)e->keys_len;
    s->key_len = (uint16_t)n;
    s->val_off = (uint32_t)e->vals_len;
    s->val_len = (uint16_t)m;
    memcpy(e->keys + e->keys_len, p, n);
    e->keys_len += n;
    memcpy(e->vals + e->vals_len, w->id, m * sizeof(int32_t));
    e->vals_len += m;
    e->used++;
    return 0;
}

static int
encode_bytes(Encoder *e, const uint8_t *s, Py_ssize_t n, IdBuf *out)
{
    if (idbuf_reserve(out, (size_t)n / 4 + 16) < 0)
        return -1;
    for (Py_ssize_t i = 0; i < n;) {
        Py_ssize_t j = piece_end(s, n, i);
        if (encode_piece(e, s + i, (size_t)(j - i), out, &e->work) < 0)
            return -1;
        i = j;
    }
    if (e->work.cap > (1u << 16))
        scratch_free(&e->work); /* one very long piece need not keep its space */
    return 0;
}

/* The UTF-8 of a str: its own buffer when ASCII, else a new bytes object in *owner. */
static int
utf8_of(PyObject *text, const uint8_t **s, Py_ssize_t *n, PyObject **owner)
{
    *owner = NULL;
    if (!PyUnicode_Check(text)) {
        PyErr_Format(PyExc_TypeError, "expected str, got %.100s", Py_TYPE(text)->tp_name);
        return -1;
    }
#if PY_VERSION_HEX < 0x030C0000
    if (PyUnicode_READY(text) < 0)
        return -1;
#endif
    if (PyUnicode_IS_ASCII(text)) {
        *s = (const uint8_t *)PyUnicode_DATA(text);
        *n = PyUnicode_GET_LENGTH(text);
        return 0;
    }
    *owner = PyUnicode_AsUTF8String(text); /* raises on lone surrogates */
    if (!*owner)
        return -1;
    *s = (const uint8_t *)PyBytes_AS_STRING(*owner);
    *n = PyBytes_GET_SIZE(*owner);
    return 0;
}

#define RELEASE_GIL_BYTES (1 << 15)

static PyObject *
Encoder_encode(Encoder *self, PyObject *text)
{
    const uint8_t *s;
    Py_ssize_t n;
    PyObject *owner;
    if (utf8_of(text, &s, &n, &owner) < 0)
        return NULL;
    IdBuf out = {0};
    int rc;
    if (n >= RELEASE_GIL_BYTES || !PyThread_acquire_lock(self->lock, NOWAIT_LOCK)) {
        Py_BEGIN_ALLOW_THREADS
        PyThread_acquire_lock(self->lock, WAIT_LOCK);
        rc = encode_bytes(self, s, n, &out);
        PyThread_release_lock(self->lock);
        Py_END_ALLOW_THREADS
    }
    else {
        rc = encode_bytes(self, s, n, &out);
        PyThread_release_lock(self->lock);
    }
    Py_XDECREF(owner);
    if (rc < 0) {
        free(out.p);
        return PyErr_NoMemory();
    }
    PyObject *list = PyList_New((Py_ssize_t)out.len);
    if (!list) {
        free(out.p);
        return NULL;
    }
    for (size_t i = 0; i < out.len; i++) {
        int32_t t = out.p[i];
        PyObject *v;
        if (t >= 0 && t < self->n_ints) {
            v = self->ints[t];
            Py_INCREF(v);
        }
        else if (!(v = PyLong_FromLong(t))) {
            Py_DECREF(list);
            free(out.p);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, v);
    }
    free(out.p);
    return list;
}

static PyObject *
Encoder_clear_cache(Encoder *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->lock)
        Py_RETURN_NONE;
    Py_BEGIN_ALLOW_THREADS
    PyThread_acquire_lock(self->lock, WAIT_LOCK);
    cache_clear(self);
    PyThread_release_lock(self->lock);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *
Encoder_cache_len(Encoder *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSize_t(self->used);
}

static int
read_int32s(PyObject *obj, const char *what, Py_buffer *view, Py_ssize_t multiple)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) < 0)
        return -1;
    if (view->len % (Py_ssize_t)(multiple * sizeof(int32_t))) {
        PyErr_Format(PyExc_ValueError, "%s: expected a multiple of %zd native int32 values",
                     what, multiple);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static int
Encoder_init(Encoder *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"byte_ids", "merges", "linear_max", "cache_max", NULL};
    PyObject *byte_obj, *merge_obj;
    int linear_max = 64;
    Py_ssize_t cache_max = CACHE_MAX_ENTRIES;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|in", kwlist, &byte_obj, &merge_obj,
                                     &linear_max, &cache_max))
        return -1;
    if (self->merges || self->narrow || self->ints || self->lock) {
        PyErr_SetString(PyExc_RuntimeError, "Encoder is already initialised");
        return -1;
    }
    if (linear_max < 0 || cache_max < 0) {
        PyErr_SetString(PyExc_ValueError, "linear_max and cache_max must be >= 0");
        return -1;
    }
    Py_buffer bv, mv;
    if (read_int32s(byte_obj, "byte_ids", &bv, 256) < 0)
        return -1;
    if (bv.len != 256 * (Py_ssize_t)sizeof(int32_t)) {
        PyErr_SetString(PyExc_ValueError, "byte_ids: expected 256 native int32 values");
        PyBuffer_Release(&bv);
        return -1;
    }
    if (read_int32s(merge_obj, "merges", &mv, 3) < 0) {
        PyBuffer_Release(&bv);
        return -1;
    }
    const int32_t *m = (const int32_t *)mv.buf;
    size_t n_merges = (size_t)mv.len / (3 * sizeof(int32_t));
    memcpy(self->byte_id, bv.buf, sizeof(self->byte_id));
    PyBuffer_Release(&bv);

    int32_t max_id = -1;
    for (int i = 0; i < 256; i++) {
        if (self->byte_id[i] < 0)
            goto negative;
        if (self->byte_id[i] > max_id)
            max_id = self->byte_id[i];
    }
    for (size_t i = 0; i < 3 * n_merges; i++) {
        if (m[i] < 0)
            goto negative;
        if (m[i] > max_id)
            max_id = m[i];
    }
    if (n_merges >= (size_t)INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "too many merges");
        PyBuffer_Release(&mv);
        return -1;
    }

    int bits = 4;
    while (((size_t)1 << bits) < 2 * n_merges + 2)
        bits++;
    size_t cap = (size_t)1 << bits;
    int narrow = max_id < NARROW_LIMIT && n_merges <= NARROW_LIMIT;
    if (narrow)
        self->narrow = PyMem_Malloc(cap * sizeof(uint64_t));
    else
        self->merges = PyMem_Malloc(cap * sizeof(MergeSlot));
    if (!self->narrow && !self->merges) {
        PyBuffer_Release(&mv);
        PyErr_NoMemory();
        return -1;
    }
    for (size_t i = 0; i < cap; i++) {
        if (narrow)
            self->narrow[i] = NARROW_EMPTY;
        else
            self->merges[i].key = EMPTY_KEY;
    }
    self->merge_mask = cap - 1;
    self->merge_shift = 64 - bits;
    for (size_t r = 0; r < n_merges; r++) {
        uint64_t key = ((uint64_t)(uint32_t)m[3 * r] << 32) | (uint32_t)m[3 * r + 1];
        uint64_t h = (key * 0x9E3779B97F4A7C15ULL) >> self->merge_shift;
        /* a pair listed twice keeps its later rank, as tokenizers' merge map does */
        if (narrow) {
            uint64_t want = ((uint64_t)m[3 * r] << 16) | (uint64_t)m[3 * r + 1];
            while (self->narrow[h] != NARROW_EMPTY && (self->narrow[h] >> 32) != want)
                h = (h + 1) & self->merge_mask;
            self->narrow[h] = want << 32 | (uint64_t)r << 16 | (uint64_t)m[3 * r + 2];
        }
        else {
            while (self->merges[h].key != EMPTY_KEY && self->merges[h].key != key)
                h = (h + 1) & self->merge_mask;
            self->merges[h] = (MergeSlot){key, (int32_t)r, m[3 * r + 2]};
        }
    }
    PyBuffer_Release(&mv);

    self->linear_max = linear_max;
    self->cache_max = (size_t)cache_max;
    self->n_ints = (Py_ssize_t)max_id + 1;
    self->ints = PyMem_Calloc((size_t)self->n_ints, sizeof(PyObject *));
    if (!self->ints) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < self->n_ints; i++)
        if (!(self->ints[i] = PyLong_FromSsize_t(i)))
            return -1;
    self->lock = PyThread_allocate_lock();
    if (!self->lock) {
        PyErr_SetString(PyExc_MemoryError, "cannot allocate a lock");
        return -1;
    }
    return 0;

negative:
    PyBuffer_Release(&mv);
    PyErr_SetString(PyExc_ValueError, "token ids must be non-negative");
    return -1;
}

static void
Encoder_dealloc(Encoder *self)
{
    PyMem_Free(self->merges);
    PyMem_Free(self->narrow);
    if (self->ints) {
        for (Py_ssize_t i = 0; i < self->n_ints; i++)
            Py_XDECREF(self->ints[i]);
        PyMem_Free(self->ints);
    }
    free(self->slots);
    free(self->keys);
    free(self->vals);
    scratch_free(&self->work);
    if (self->lock)
        PyThread_free_lock(self->lock);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Encoder_call_guard(Encoder *self, PyObject *text)
{
    if (!self->lock) {
        PyErr_SetString(PyExc_RuntimeError, "Encoder was not initialised");
        return NULL;
    }
    return Encoder_encode(self, text);
}

static PyMethodDef Encoder_methods[] = {
    {"encode", (PyCFunction)Encoder_call_guard, METH_O,
     "encode(text) -> list[int]: the BPE ids of text, pre-tokenized as GPT-2 does."},
    {"clear_cache", (PyCFunction)Encoder_clear_cache, METH_NOARGS,
     "Forget every cached piece."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Encoder_getset[] = {
    {"cache_len", (getter)Encoder_cache_len, NULL, "How many pieces the cache holds.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject EncoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gptkit.tokenizer._fastbpe.Encoder",
    .tp_basicsize = sizeof(Encoder),
    .tp_dealloc = (destructor)Encoder_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Encoder(byte_ids, merges, linear_max=64, cache_max=1 << 20): byte-level BPE "
              "with GPT-2's pre-tokenizer.\n\nbyte_ids: 256 native int32, the id of each "
              "byte; merges: (left, right, merged) native int32 triples in rank order; "
              "linear_max: the longest piece merged by linear scans rather than a heap; "
              "cache_max: how many pieces the cache holds before it starts over.",
    .tp_methods = Encoder_methods,
    .tp_getset = Encoder_getset,
    .tp_init = (initproc)Encoder_init,
    .tp_new = PyType_GenericNew,
};

/* ---- module functions ------------------------------------------------------------------- */

static PyObject *
fastbpe_split(PyObject *Py_UNUSED(module), PyObject *text)
{
    const uint8_t *s;
    Py_ssize_t n;
    PyObject *owner;
    if (utf8_of(text, &s, &n, &owner) < 0)
        return NULL;
    PyObject *list = PyList_New(0);
    for (Py_ssize_t i = 0; list && i < n;) {
        Py_ssize_t j = piece_end(s, n, i);
        PyObject *piece = PyUnicode_DecodeUTF8((const char *)s + i, j - i, "strict");
        if (!piece || PyList_Append(list, piece) < 0)
            Py_CLEAR(list);
        Py_XDECREF(piece);
        i = j;
    }
    Py_XDECREF(owner);
    return list;
}

static PyObject *
fastbpe_classes(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    return PyBytes_FromStringAndSize((const char *)cp_class, N_CODEPOINTS);
}

static PyMethodDef module_methods[] = {
    {"split", (PyCFunction)fastbpe_split, METH_O,
     "split(text) -> list[str]: GPT-2's pre-tokenization of text."},
    {"classes", (PyCFunction)fastbpe_classes, METH_NOARGS,
     "classes() -> bytes: the class of each code point: 0 other, 1 letter (\\p{L}), "
     "2 number (\\p{N}), 3 whitespace (\\s)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastbpe_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "gptkit.tokenizer._fastbpe",
    .m_doc = "Byte-level BPE with GPT-2's pre-tokenizer, in C; see gptkit.tokenizer.bpe.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__fastbpe(void)
{
    build_classes();
    if (PyType_Ready(&EncoderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&fastbpe_module);
    if (!m)
        return NULL;
    Py_INCREF(&EncoderType);
    if (PyModule_AddObject(m, "Encoder", (PyObject *)&EncoderType) < 0) {
        Py_DECREF(&EncoderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
