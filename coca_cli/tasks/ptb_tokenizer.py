"""The PTB tokenisation of COCO caption evaluation, in pure Python: no Java needed.

The MS COCO caption evaluation code (``pycocoevalcap``, the reference every captioning paper
reports) tokenises captions before scoring them, and the scores depend on how:

* :func:`tokenize` is a pure-Python re-implementation of what ``PTBTokenizer.tokenize`` does:
  Stanford CoreNLP 3.4.1's PTB tokenizer run with ``-preserveLines -lowerCase`` over the
  captions joined by newlines, then every token that is one of :data:`PUNCTUATIONS` dropped.
  The lexer below follows the rules of CoreNLP's ``PTBLexer.flex`` (longest match over all
  rules, trailing context included, ties to the earlier rule; literal text case-insensitive,
  character classes not), restricted to what 3.4.1 does with default options, and is checked
  against the real jar on hundreds of captions by the test suite. Known differences, all on
  text that does not occur in COCO-style captions, are listed in :data:`KNOWN_DIFFERENCES`.
"""

from __future__ import annotations

from typing import Hashable, Iterable, Mapping, Optional, Sequence

import regex

__all__ = ["PUNCTUATIONS", "KNOWN_DIFFERENCES", "ptb_tokens", "tokenize_caption", "tokenize"]

# The tokens pycocoevalcap drops after tokenising. Note that the tokenizer runs with
# -lowerCase, so brackets come out as "-lrb-"/"-rrb-" and are *not* dropped (the list has
# them upper-case); "-lsb-"/"-rsb-" are not in the list at all. We reproduce that.
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                          "--", "...", ";"])

KNOWN_DIFFERENCES = """\
Known differences from pycocoevalcap's PTBTokenizer (CoreNLP 3.4.1):
- Characters the Java lexer treats as line breaks inside a caption (carriage return, form
  feed, vertical tab, U+2028, U+2029) make pycocoevalcap shift every later caption onto the
  wrong image; we treat them as spaces, like the newline pycocoevalcap already replaces.
- Characters outside the Basic Multilingual Plane (emoji) are deleted by both, but the Java
  lexer sees them as two UTF-16 halves; where such a character touches a word the tokens
  around it may differ.
- Python's Unicode tables are newer than the 2014 lexer's: letters, digits and symbols added
  to Unicode since then may be kept, split or deleted differently.
- The lexer's rarely-used corners (SGML tags spanning lines, URLs, e-mail addresses, phone
  numbers) were reconstructed from its grammar and checked on random text, not exhaustively.
"""

# --------------------------------------------------------------------------------------------
# The lexer
# --------------------------------------------------------------------------------------------


def _ci(pattern: str) -> str:
    """JFlex %caseless: ASCII letters written literally match either case; classes do not."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            if pattern[i + 1] in "pP" and pattern[i + 2] == "{":
                j = pattern.index("}", i) + 1
            elif pattern[i + 1] == "u":
                j = i + 6
            elif pattern[i + 1] == "x":
                j = i + 4
            else:
                j = i + 2
            out.append(pattern[i:j])
            i = j
        elif c == "[":
            j = i + 1
            if j < n and pattern[j] == "^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            out.append(pattern[i:j + 1])
            i = j + 1
        elif c == "(" and pattern.startswith("(?", i):
            j = i + 2
            if pattern.startswith("P<", j):
                j = pattern.index(">", j) + 1
            elif pattern[j] == "<":
                j += 2
            else:
                j += 1
            out.append(pattern[i:j])
            i = j
        elif c == "{" and regex.match(r"\{\d+(,\d*)?\}", pattern[i:]):
            j = pattern.index("}", i) + 1
            out.append(pattern[i:j])
            i = j
        elif c.isascii() and c.isalpha():
            out.append(f"[{c.lower()}{c.upper()}]")
            i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


# Macros, in the lexer's own terms (Python `regex` syntax). ALPHA/ALNUM stand for JFlex's
# \p{Alpha} and \p{Alpha}|\p{Digit}.
_M: dict[str, str] = {}
_M["SPACE"] = r"[ \t\u00A0\u2000-\u200A\u3000]"
_M["NEWLINE"] = r"(?:\r\n|\r|\n|\u2028|\u2029|\u000B|\u000C|\u0085)"
_M["SPACENL"] = rf"(?:{_M['SPACE']}|{_M['NEWLINE']})"
_M["SPACENLS"] = rf"{_M['SPACENL']}+"
_M["SPACES"] = rf"{_M['SPACE']}+"
_M["ALPHA"] = r"\p{Alphabetic}"
_M["ALNUM"] = r"[\p{Alphabetic}\p{Nd}]"
_M["SGML"] = (r"<(?:[!?][A-Za-z\-][^>\r\n]*|[A-Za-z][A-Za-z0-9_:.\-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.\-]*|"
              r"[A-Za-z][A-Za-z0-9_:.\-]*[ ]*=[ ]*(?:'[^']*'|\"[^\"]*\"|[A-Za-z][A-Za-z0-9_:.\-]*)))*[ ]*/?|"
              r"/[A-Za-z][A-Za-z0-9_:.\-]*)[ ]*>")
_M["SPMDASH"] = r"&(?:MD|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]"
_M["SPAMP"] = r"&amp;"
_M["SPPUNC"] = r"&(?:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);"
_M["SPLET"] = r"&[aeiouAEIOU](?:acute|grave|uml);"
_M["SENTEND"] = rf"{_M['SPACENL']}(?:{_M['SPACENL']}|\p{{Lu}}|{_M['SGML']})"
_M["DIGIT"] = r"[\p{Nd}\u07C0-\u07C9]"
D = _M["DIGIT"]
_M["DATE"] = rf"{D}{{1,2}}[\-/]{D}{{1,2}}[\-/]{D}{{2,4}}"
_M["NUM"] = rf"(?:{D}*(?:[.:,\u066B\u066C]{D}+)+|{D}+(?:[.:,\u00AD\u066B\u066C\u2009\u202F]{D}+)*)"
_M["NUMBER"] = rf"[\-+]?{_M['NUM']}"
_M["SUBSUPNUM"] = r"[\u207A\u207B\u208A\u208B]?(?:[\u2070\u00B9\u00B2\u00B3\u2074-\u2079]+|[\u2080-\u2089]+)"
_M["FRAC"] = rf"(?:{D}{{1,4}}[\- \u00A0])?{D}{{1,4}}(?:\\?/|\u2044){D}{{1,4}}"
_M["FRAC2"] = r"[\u00BC\u00BD\u00BE\u2153-\u215E]"
_M["DOLSIGN"] = r"(?:[A-Z]*\$|#)"
_M["DOLSIGN2"] = r"[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC]"
_M["LETTER"] = (r"(?:[\p{L}\u00AD\u0237-\u024F\u02C2-\u02C5\u02D2-\u02DF\u02E5-\u02FF\u0300-\u036F\u0370-\u037D"
                r"\u0384\u0385\u03CF\u03F6\u03FC-\u03FF\u0483-\u0487\u04CF\u04F6-\u04FF\u0510-\u0525"
                r"\u055A-\u055F\u0591-\u05BD\u05BF\u05C1\u05C2\u05C4\u05C5\u05C7\u0615-\u061A\u063B-\u063F"
                r"\u064B-\u065E\u0670\u06D6-\u06EF\u06FA-\u06FF\u070F\u0711\u0730-\u074F\u0750-\u077F"
                r"\u07A6-\u07B1\u07CA-\u07F5\u07FA\u0900-\u0903\u093C\u093E-\u094E\u0951-\u0955\u0962-\u0963"
                r"\u0981-\u0983\u09BC-\u09C4\u09C7\u09C8\u09CB-\u09CD\u09D7\u09E2\u09E3\u0A01-\u0A03\u0A3C"
                r"\u0A3E-\u0A4F\u0A81-\u0A83\u0ABC-\u0ACF\u0B82\u0BBE-\u0BC2\u0BC6-\u0BC8\u0BCA-\u0BCD"
                r"\u0C01-\u0C03\u0C3E-\u0C56\u0D3E-\u0D44\u0D46-\u0D48\u0E30-\u0E3A\u0E47-\u0E4E\u0EB1-\u0EBC"
                r"\u0EC8-\u0ECD]|" + _M["SPLET"] + ")")
L = _M["LETTER"]
_M["WORD"] = rf"{L}(?:{L}|{D})*(?:[.!?]{L}(?:{L}|{D})*)*"
_M["FILENAME_EXT"] = r"(?:bat|bmp|bz2|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm|html|jar|java|jpeg|jpg|mov|mp3|" \
                     r"pdf|php|pl|png|ppt|ps|py|sql|tar|txt|wav|x|xml|zip)"
_M["FILENAME"] = rf"[\p{{Alphabetic}}\p{{Nd}}]+(?:[\-._/][\p{{Alphabetic}}\p{{Nd}}]+)*\.{_M['FILENAME_EXT']}"
_M["APOS"] = r"(?:['\u0092\u2019]|&apos;)"
_M["APOSETCETERA"] = rf"(?:{_M['APOS']}|[`\u0091\u2018\u201B])"
_M["HYPHEN"] = r"[\-_\u058A\u2010\u2011]"
A, AN, AE = _M["ALPHA"], _M["ALNUM"], _M["APOSETCETERA"]
_M["THING"] = (rf"(?:[dDoOlL]{AE}{AN})?{AN}+(?:{_M['HYPHEN']}(?:[dDoOlL]{AE}{AN})?{AN}+)*")
_M["THINGA"] = rf"[A-Z]+(?:(?:[+&]|{_M['SPAMP']})[A-Z]+)+"
_M["THING3"] = r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"
_M["ACRO"] = r"(?:[A-Za-z](?:\.[A-Za-z])*|(?:Canada|Sino|Korean|EU|Japan|non)-U\.S|U\.S\.-(?:U\.K|U\.S\.S\.R))"
_M["ACRO2"] = r"(?:[A-Za-z](?:\.[A-Za-z])+|(?:Canada|Sino|Korean|EU|Japan|non)-U\.S|U\.S\.-(?:U\.K|U\.S\.S\.R))"
_M["HTHING"] = rf"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:[A-Za-z0-9\u00AD]+|{_M['ACRO2']}\.))+"
_M["REDAUX"] = rf"{_M['APOS']}(?:[msdMSD]|re|ve|ll)"
_M["SWORD"] = r"[A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*"
_M["SREDAUX"] = rf"n{AE}t"
_M["APOWORD"] = (rf"(?:{_M['APOS']}n{_M['APOS']}?|[lLdDjJ]{_M['APOS']}|Dunkin{_M['APOS']}|somethin{_M['APOS']}|"
                 rf"ol{_M['APOS']}|{_M['APOS']}em|[A-HJ-XZn]{AE}[\p{{L}}]{{2}}[\p{{L}}]*|{_M['APOS']}[2-9]0s|"
                 rf"{_M['APOS']}till?|[\p{{L}}][\p{{L}}]*[aeiouyAEIOUY]{AE}[aeiouA-Z][\p{{L}}]*|{_M['APOS']}cause|"
                 rf"cont'd\.?|'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l|O{AE}o)")
_M["APOWORD2"] = rf"y{_M['APOS']}"
_M["FULLURL"] = r"https?://[^ \t\n\f\r\"<>|(){}]+[^ \t\n\f\r\"<>|.!?(){},\-]"
_M["LIKELYURL"] = (r"(?:(?:www\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\.)+[a-zA-Z]{2,4})|"
                   r"(?:(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\.)+(?:com|net|org|edu)))"  # sic: ",-_" is a range
                   r"(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},\-])?")
_M["EMAIL"] = (r"(?:&lt;|<)?[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00A0{}]*@(?:[^ \t\n\f\r\"<>|(){}.\u00A0]+\.)*"
               r"[^ \t\n\f\r\"<>|(){}.\u00A0]+(?:&gt;|>)?")
_M["TWITTER"] = rf"[@\uFF20][a-zA-Z_][a-zA-Z_0-9]*|[#\uFF03]{L}+"
_M["ABMONTH"] = r"Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec"
_M["ABDAYS"] = r"Mon|Tue|Tues|Wed|Thu|Thurs|Fri"
_M["ABSTATE"] = (r"Ala|Ariz|[A]z|[A]rk|Calif|Colo|Conn|Ct|Dak|[D]el|Fla|Ga|[I]ll|Ind|Kans?|Ky|[L]a|[M]ass|Md|Mich|"
                 r"Minn|[M]iss|Mo|Mont|Neb|Nev|Okla|[O]re|[P]a|Penn|Tenn|[T]ex|Va|Vt|[W]ash|Wisc?|Wyo")
_M["ABCOMP"] = r"Inc|Cos?|Corp|Pp?t[ye]s?|Ltd|Plc|Rt|Bancorp|Bhd|Assn|Univ|Intl|Sys"
_M["ABNUM"] = r"tel|est|ext|sq"
_M["ABPTIT"] = r"Jr|Sr|Bros|(?:Ed|Ph)\.D|Blvd|Rd|Esq"
_M["ABBREV1"] = (rf"(?:{_M['ABMONTH']}|{_M['ABDAYS']}|{_M['ABSTATE']}|{_M['ABCOMP']}|{_M['ABNUM']}|{_M['ABPTIT']}|"
                 r"etc|al|seq|Bldg)\.")
_M["ABTITLE"] = (r"Mr|Mrs|Ms|[M]iss|Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev|Maj|Sgt|Cpl|"
                 r"Pvt|Capt|Ste?|Ave|Pres|Lieut|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|Mt|Ft|Adj|Adv|Asst|Assoc|Ens|"
                 r"Insp|Mlle|Mme|Msgr|Sfc")
_M["ABCOMP2"] = r"Invt|Elec|Natl|M[ft]g|Dept"
_M["ABBREV4"] = rf"(?:{_M['ABTITLE']}|vs|[v]|Alex|Wm|Jos|Cie|a\.k\.a|cf|TREAS|Ph|{_M['ACRO']}|{_M['ABCOMP2']})"
_M["ABBREV2"] = rf"{_M['ABBREV4']}\."
_M["ACRONYM"] = rf"{_M['ACRO']}\."
_M["ABBREV3"] = r"(?:ca|figs?|prop|nos?|art|bldg|prop|pp|op)\."
_M["PHONE"] = (r"(?:\([0-9]{2,3}\)[ \u00A0]?|(?:\+\+?)?(?:[0-9]{2,4}[\- \u00A0])?[0-9]{2,4}[\- \u00A0])"
               r"[0-9]{3,4}[\- \u00A0]?[0-9]{3,5}|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5}")
_M["LDOTS"] = r"(?:\.\.\.\.?\.?|[\u0085\u2026])"
_M["SPACEDLDOTS"] = r"\.[ \u00A0](?:\.[ \u00A0])+\."
_M["INSENTP"] = r"[,;:\u3001]"
_M["QUOTES"] = (rf"(?:{_M['APOS']}|''|[`\u2018\u2019\u201A\u201B\u201C\u201D\u0091\u0092\u0093\u0094\u201E\u201F"
                 r"\u2039\u203A\u00AB\u00BB]{1,2})")
_M["DBLQUOT"] = r"(?:\"|&quot;)"
_M["TBSPEC"] = (rf"(?:-(?:RRB|LRB|RCB|LCB|RSB|LSB)-|C\.D\.s|pro-|anti-|S(?:&|&amp;)P-500|S(?:&|&amp;)Ls|"
                rf"Cap{_M['APOS']}n|c{_M['APOS']}est)")
_M["TBSPEC2"] = rf"{_M['APOS']}[0-9][0-9]"
_M["SMILEY"] = r"[<>]?[:;=][\-o*']?[()DPdpO\\{@|\[\]]"
_M["ASIANSMILEY"] = (r"(?:[\^x=~<>]\.\[\^x=~<>]|[\-\^x=~<>']_[\-\^x=~<>']|\([\-\^x=~<>'][_.]?[\-\^x=~<>']\)|"
                     r"\([\^x=~<>']-[\^x=~<>'`]\))")
_M["MISCSYMBOL"] = (r"[+%&~\^|\\\u00A6\u00A7\u00A8\u00A9\u00AC\u00AE\u00AF\u00B0-\u00B3\u00B4-\u00BA\u00D7\u00F7"
                    r"\u0387\u05BE\u05C0\u05C3\u05C6\u05F3\u05F4\u0600-\u0603\u0606-\u060A\u060C\u0614\u061B"
                    r"\u061E\u066A\u066D\u0703-\u070D\u07F6\u07F7\u07F8\u0964\u0965\u0E4F\u1FBD\u2016\u2017"
                    r"\u2020-\u2025\u2030-\u2038\u203B\u203C\u2043\u203E-\u2042\u2044\u207A-\u207F\u208A-\u208E"
                    r"\u2100-\u214F\u2190-\u21FF\u2200-\u2BFF\u3001-\u3006\u3008-\u3020\u30FB\uFF01-\uFF0F"
                    r"\uFF1A-\uFF20\uFF3B-\uFF40\uFF5B-\uFF65]")

_ACRONYM_FOLLOWERS = ("[A]bout|[A]ccording|[A]dditionally|[A]fter|[A]n|[A]|[A]s|[A]t|[B]ut|[D]id|[D]uring|[E]arlier|"
                      "[H]e|[H]er|[H]ere|[H]ow|[H]owever|[I]f|[I]n|[I]t|[L]ast|[M]any|[M]ore|[M]r\\.|[M]s\\.|[N]ow|"
                      "[O]nce|[O]ne|[O]ther|[O]ur|[S]he|[S]ince|[S]o|[S]ome|[S]uch|[T]hat|[T]he|[T]heir|[T]hen|"
                      "[T]here|[T]hese|[T]hey|[T]his|[W]e|[W]hen|[W]hile|[W]hat|[W]ho|[W]hy|[Y]et|[Y]ou")

# --- token transformations (the rules' actions) ---

_SINGLE_QUOTE = regex.compile(r"&apos;|'")
_DOUBLE_QUOTE = regex.compile(r"\"|&quot;")
_LEFT_SINGLE = regex.compile("[\u0091\u2018\u201B\u2039]")
_RIGHT_SINGLE = regex.compile("[\u0092\u2019\u203A]")
_LEFT_DOUBLE = regex.compile("[\u0093\u201C\u00AB]")
_RIGHT_DOUBLE = regex.compile("[\u0094\u201D\u00BB]")


def _quotes(tok: str, left: bool) -> str:
    """PTB3 "latex" quotes: ` and `` open, ' and '' close."""
    if left:
        tok = _DOUBLE_QUOTE.sub("``", _SINGLE_QUOTE.sub("`", tok))
    else:
        tok = _DOUBLE_QUOTE.sub("''", _SINGLE_QUOTE.sub("'", tok))
    tok = _LEFT_SINGLE.sub("`", tok)
    tok = _RIGHT_SINGLE.sub("'", tok)
    tok = _LEFT_DOUBLE.sub("``", tok)
    return _RIGHT_DOUBLE.sub("''", tok)


def _amp(tok: str) -> str:
    return regex.sub("(?i)&amp;", "&", tok)


def _currency(tok: str) -> str:
    tok = tok.replace("\u00A2", "cents").replace("\u00A3", "#")
    return regex.sub("[\u0080\u00A4\u20A0\u20AC]", "$", tok)


_FRACTIONS = {"\u00BC": "1/4", "\u00BD": "1/2", "\u00BE": "3/4", "\u2153": "1/3", "\u2154": "2/3"}


def _number(tok: str) -> str:
    out = "".join(ch for ch in tok if ch not in "\u00AD\u066C\u2009\u202F")
    return out if out == tok else out.strip()


def _parens(tok: str) -> str:
    return tok.replace("(", "-LRB-").replace(")", "-RRB-")


_SOFT_HYPHEN = "\u00AD"


def _nosoft(tok: str) -> str:
    return tok.replace(_SOFT_HYPHEN, "") or "-"


class _Rule:
    __slots__ = ("name", "pattern", "action", "needs")

    def __init__(self, name: str, main: str, context: Optional[str], action, needs: Optional[str] = None):
        self.name = name
        self.needs = needs  # a character every match contains before the next space (a shortcut)
        body = f"(?P<m>{main})" + (f"(?:{context})" if context is not None else "")
        self.pattern = regex.compile(_ci(body), regex.POSIX)
        self.action = action  # (matched text) -> (token or None, characters consumed or None for all)


def _keep(text):
    return text, None


def _skip(text):
    return None, None


def _pushback(n):
    return lambda text: (text[:-n], len(text) - n)


def _acronym(text):
    if len(text) == 2:  # "I." : the letter now, the period next time
        return text[:-1], len(text) - 1
    return text, len(text) - 1  # "U.S." and a period again next time


def _abbrev1(text):
    return text, len(text) - 1


def _dashes(text):
    return ("--" if 3 <= len(text) <= 4 else text), None


_NL = "\n"  # the token for a line break


def _build_rules() -> list[_Rule]:
    M = _M
    r: list[tuple] = [
        ("PROG_LANGS", r"c[+][+]|(?:c|f)#", None, _keep),
        ("ASSIMILATIONS3", r"cannot|'twas", None, _pushback(3)),
        ("ASSIMILATIONS2", rf"{M['APOS']}tis|gonna|gotta|lemme|gimme|wanna", None, _pushback(2)),
        ("SGML", M["SGML"], None, lambda t: (regex.sub(r"[ \r\n]", "\u00A0", t), None)),
        ("SPMDASH", M["SPMDASH"], None, lambda t: ("--", None)),
        ("SPAMP", M["SPAMP"], None, lambda t: (_amp(t), None)),
        ("SPPUNC", M["SPPUNC"], None, _keep),
        ("WORD/REDAUX", M["WORD"], M["REDAUX"], lambda t: (_nosoft(t), None)),
        ("SWORD/SREDAUX", M["SWORD"], M["SREDAUX"], lambda t: (_nosoft(t), None)),
        ("WORD", M["WORD"], None, lambda t: (_nosoft(t), None)),
        ("APOWORD", M["APOWORD"], None, _keep),
        ("APOWORD2", M["APOWORD2"], r"\p{L}", _keep),
        ("FULLURL", M["FULLURL"], None, _keep),
        ("LIKELYURL", M["LIKELYURL"], None, _keep),
        ("EMAIL", M["EMAIL"], None, _keep, "@"),
        ("TWITTER", M["TWITTER"], None, _keep),
        ("REDAUX/", M["REDAUX"], r"[^A-Za-z]", lambda t: (_quotes(t, False), None)),
        ("SREDAUX", M["SREDAUX"], None, lambda t: (_quotes(t, False), None)),
        ("DATE", M["DATE"], None, _keep),
        ("NUMBER", M["NUMBER"], None, lambda t: (_number(t), None)),
        ("SUBSUPNUM", M["SUBSUPNUM"], None, _keep),
        ("FRAC", M["FRAC"], None, lambda t: (t.replace(" ", "\u00A0"), None)),
        ("FRAC2", M["FRAC2"], None, lambda t: (_FRACTIONS.get(t, t), None)),
        ("TBSPEC", M["TBSPEC"], None, lambda t: (_amp(t), None)),
        ("THING3", M["THING3"], None, _keep),
        ("DOLSIGN", M["DOLSIGN"], None, _keep),
        ("DOLSIGN2", M["DOLSIGN2"], None, lambda t: (_currency(t), None)),
        ("ACRONYM/", M["ACRONYM"], rf"{M['SPACENLS']}(?:{_ACRONYM_FOLLOWERS}|{M['SGML']}){M['SPACENL']}",
         _acronym),
        ("ABBREV3/", M["ABBREV3"], rf"{M['SPACENL']}?\p{{Nd}}", _keep),
        ("PTY/", r"(?:pt[eyEY]|co)\.", rf"{M['SPACE']}(?:ltd|lim)", _keep),
        ("ABBREV1/SENTEND", M["ABBREV1"], M["SENTEND"], _abbrev1),
        ("ABBREV1/..", M["ABBREV1"], r"(?s:..)", _keep),
        ("ABBREV1", M["ABBREV1"], None, _abbrev1),
        ("ABBREV2", M["ABBREV2"], None, _keep),
        ("ABBREV4/", M["ABBREV4"], M["SPACE"], _keep),
        ("ACRO/", M["ACRO"], M["SPACENL"], _keep),
        ("TBSPEC2/", M["TBSPEC2"], M["SPACENL"], _keep),
        ("FILENAME/", M["FILENAME"], rf"{M['SPACENL']}|[.?!,\"'<]", _keep),
        ("WORD./", rf"{M['WORD']}\.", M["INSENTP"], lambda t: (_nosoft(t), None)),
        ("PHONE", M["PHONE"], None, lambda t: (_parens(t.replace(" ", "\u00A0")), None)),
        ("DBLQUOT/", M["DBLQUOT"], r"[A-Za-z0-9$]", lambda t: (_quotes(t, True), None)),
        ("DBLQUOT", M["DBLQUOT"], None, lambda t: (_quotes(t, False), None)),
        ("DEL", r"\x7F", None, _skip),
        ("LESSTHAN", r"<|&lt;", None, lambda t: ("<", None)),
        ("GREATERTHAN", r">|&gt;", None, lambda t: (">", None)),
        ("SMILEY/", M["SMILEY"], r"[^\p{Alphabetic}\p{Nd}]", lambda t: (_parens(t), None)),
        ("ASIANSMILEY", M["ASIANSMILEY"], None, lambda t: (_parens(t), None)),
        ("LCB", r"\{", None, lambda t: ("-LCB-", None)),
        ("RCB", r"\}", None, lambda t: ("-RCB-", None)),
        ("LSB", r"\[", None, lambda t: ("-LSB-", None)),
        ("RSB", r"\]", None, lambda t: ("-RSB-", None)),
        ("LRB", r"\(", None, lambda t: ("-LRB-", None)),
        ("RRB", r"\)", None, lambda t: ("-RRB-", None)),
        ("HYPHENS", r"\-+", None, _dashes),
        ("LDOTS", rf"{M['LDOTS']}|{M['SPACEDLDOTS']}", None, lambda t: ("...", None)),
        ("FNMARKS", r"@+|#+|_+", None, _keep),
        ("ASTS", r"\*+|(?:\\\*){1,3}", None, _keep),
        ("INSENTP", M["INSENTP"], None, _keep),
        ("BANGS", r"[?!]+", None, _keep),
        ("PERIOD", r"[.\u00A1\u00BF\u037E\u0589\u061F\u06D4\u0700-\u0702\u07FA\u3002]", None, _keep),
        ("EQUALS", r"=", None, _keep),
        ("SLASH", r"/", None, _keep),
        ("HTHING", M["HTHING"], None, lambda t: (_nosoft(t), None)),
        ("HTHING./", rf"{M['HTHING']}\.", M["INSENTP"], lambda t: (_nosoft(t), None)),
        ("THING./", rf"{M['THING']}\.", M["INSENTP"], _keep),
        ("THING", M["THING"], None, _keep),
        ("THINGA./", rf"{M['THINGA']}\.", M["INSENTP"], lambda t: (_amp(t), None)),
        ("THINGA", M["THINGA"], None, lambda t: (_amp(t), None)),
        ("QUOTE/", "'", r"[A-Za-z][^ \t\n\r\u00A0]", lambda t: (_quotes(t, True), None)),
        ("QUOTES", M["QUOTES"], None, lambda t: (_quotes(t, False), None)),
        ("REDAUX", M["REDAUX"], None, lambda t: (_quotes(t, False), None)),
        ("FAKEDUCKFEET", r"<<|>>", None, _keep),
        ("MISCSYMBOL", M["MISCSYMBOL"], None, _keep),
        ("SPACES", rf"\x00|{M['SPACES']}|[\u200B\u200E-\u200F\uFEFF]", None, _skip),
        ("NEWLINE", M["NEWLINE"], None, lambda t: (_NL, None)),
        ("NBSP", r"&nbsp;", None, _skip),
    ]
    return [_Rule(*spec) for spec in r]


_RULES: Optional[list[_Rule]] = None
_CANDIDATES: dict[str, list[_Rule]] = {}
_CHUNK = regex.compile(r"[^ \t\n\f\r\u00A0]*")
_SPACE_RUN = regex.compile(_M["SPACES"])
# Fast path: an ASCII word followed by a space or a line end can only be lexed as that word
# (unless it is one of the special forms); so can one followed by [,;:], by [!?] not before a
# letter, or by a sentence-final period, as long as no '@', '/' or '-' follows before the next
# space (e-mail addresses, URLs and hyphenated tokens may run across such punctuation).
_PLAIN_WORD = regex.compile(r"[A-Za-z]+(?:(?=[ \n]|\Z)|(?![^ \n]*[@/\-])(?:(?=[,;:]|[!?](?!\p{L}))|"
                            r"(?P<dot>(?=\.(?:[ \n]|\Z)))))")
_ABBREVIATION = regex.compile(_ci("|".join(f"(?:{_M[k]})" for k in ("ABBREV1", "ABBREV2", "ABBREV3"))
                                  + r"|(?:pt[eyEY]|co)\."))
_SPECIAL_WORDS = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])


def _lex(text: str, trace: bool = False) -> list:
    """Tokens of ``text`` (newlines as "\\n" tokens), exactly as the Java lexer cuts them."""
    global _RULES
    if _RULES is None:
        _RULES = _build_rules()
    tokens: list = []
    pos, n = 0, len(text)
    while pos < n:
        ch = text[pos]
        if ch == " " or ch == "\t":  # a run of spaces (which may end in a non-breaking one)
            pos = _SPACE_RUN.match(text, pos).end()
            continue
        if ch == "\n":
            tokens.append(_NL)
            pos += 1
            continue
        m = _PLAIN_WORD.match(text, pos)  # fast path: a plain word before a space is a word
        if (m is not None and m.group().lower() not in _SPECIAL_WORDS
                and (m.group("dot") is None or not _ABBREVIATION.fullmatch(m.group() + "."))):
            tokens.append((m.group(), "WORD") if trace else m.group())
            pos = m.end()
            continue
        candidates = _CANDIDATES.get(ch)
        if candidates is None:  # the rules that can match text starting with this character
            candidates = _CANDIDATES[ch] = [r for r in _RULES if r.pattern.match(ch, partial=True)]
        best, best_len, chunk = None, 0, None
        for rule in candidates:
            if rule.needs is not None:
                if chunk is None:
                    chunk = _CHUNK.match(text, pos).group()
                if rule.needs not in chunk:
                    continue
            m = rule.pattern.match(text, pos)
            if m is not None and m.end() - pos > best_len:
                best, best_len = (rule, m), m.end() - pos
        if best is None:  # untokenizable: deleted (the default "firstDelete")
            pos += 1
            continue
        rule, m = best
        token, consumed = rule.action(m.group("m"))
        pos += len(m.group("m")) if consumed is None else consumed
        if token is not None:
            tokens.append((token, rule.name) if trace else token)
    return tokens


_LINE_BREAKS = regex.compile("\r\n|[\r\n\u000B\u000C\u2028\u2029]")


def ptb_tokens(caption: str) -> list[str]:
    """The lower-cased PTB tokens of one caption, punctuation included."""
    return [t.lower() for t in _lex(_LINE_BREAKS.sub(" ", caption)) if t != _NL]


def _strip_punct(tokens: Iterable[str]) -> str:
    return " ".join(t for t in tokens if t not in PUNCTUATIONS)


def tokenize_caption(caption: str) -> str:
    """One caption in COCO evaluation form: PTB tokens, lower-case, punctuation dropped."""
    return _strip_punct(ptb_tokens(caption))


def tokenize(captions_for_image: Mapping[Hashable, Sequence]) -> dict[Hashable, list[str]]:
    """Drop-in for ``pycocoevalcap``'s ``PTBTokenizer().tokenize``.

    Takes ``{key: [caption, ...]}`` where a caption is a string or a ``{"caption": str}`` dict
    (COCO annotation style) and returns ``{key: [tokenized caption, ...]}``. As in the Java
    version, all captions are tokenised as one text, one caption per line, so an abbreviation
    at the end of a caption sees the start of the next one.
    """
    keys, lines = [], []
    for key, captions in captions_for_image.items():
        for c in captions:
            keys.append(key)
            text = c["caption"] if isinstance(c, Mapping) else c
            lines.append(_LINE_BREAKS.sub(" ", text))
    out: dict[Hashable, list[str]] = {}
    current: list[str] = []
    line = 0
    tokens = _lex("\n".join(lines))
    tokens.append(_NL)
    for tok in tokens:
        if tok == _NL:
            if line < len(keys):
                out.setdefault(keys[line], []).append(_strip_punct(current))
            current = []
            line += 1
        else:
            current.append(tok.lower())
    return out
