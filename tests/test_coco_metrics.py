"""COCO caption metrics: our Python tokenizer and scorers against pycocoevalcap (the Java reference)."""

import math
import random

import pytest

from coca_cli.tasks import caption_metrics as cm
from coca_cli.tasks import ptb_tokenizer as ptb

# COCO-style captions (the first five are real MSCOCO references) and the constructs the
# evaluation's tokenizer treats specially: contractions, possessives, hyphens, numbers,
# quotes, brackets, ampersands, abbreviations, ellipses, currency, non-ASCII text.
CAPTIONS = [
    'A man with a red helmet on a small moped on a dirt road. ',
    'Man riding a motor bike on a dirt road on the countryside.',
    'A man riding on the back of a motorcycle.',
    'A dirt path with a young person on a motor bike rests to the foreground of a verdant area with a bridge and a background of cloud-wreathed mountains. ',
    'A man in a red shirt and a red hat is on a motorcycle on a hill side.',
    'A young girl inhales with the intent of blowing out a candle. ',
    'A young girl is preparing to blow out her candle.',
    'A kid is to blow out the single candle in a bowl of birthday goodness. ',
    'Girl blowing out the candle on an ice-cream ',
    'A little girl is getting ready to blow out a candle on a small dessert.',
    'A man riding a wave on top of a surfboard.',
    'Two giraffes standing next to each other in a field.',
    'A plate of food with broccoli, rice and chicken.',
    'The kitchen is clean and ready for us to see.',
    'A cat laying on top of a laptop computer.',
    'a bathroom with a toilet, sink and shower',
    'A group of people standing around a table with food on it',
    "There is a dog that's sitting in the car's passenger seat.",
    "It's a sunny day at the beach and people are flying kites.",
    'Two men playing frisbee in a park; one of them is jumping.',
    "A woman holding an umbrella in the rain (it's pouring).",
    'A stop sign that says "STOP" on a street corner.',
    "A sign that reads 'No Parking' next to a fire hydrant.",
    'A 10-year-old boy swinging a baseball bat at a ball.',
    'An old-fashioned clock tower in the middle of town.',
    'A black-and-white photo of a train at the station.',
    'A double-decker bus driving down a street in London.',
    'Three zebras grazing on grass at the zoo & a giraffe nearby.',
    'A pizza with pepperoni, mushrooms & olives on a wooden table.',
    'A man and a woman cutting a wedding cake together!',
    'Is this a cat or a dog?',
    'The man is wearing a tie... and a suit.',
    'A kitchen with stainless steel appliances and granite counter-tops.',
    'A close up of a sandwich on a plate',
    'A brown and white dog catching a frisbee in mid-air.',
    'Several people are skiing down a snow-covered slope.',
    'A herd of sheep walking across a lush green field.',
    "Someone's hand holding a cell phone with a cracked screen.",
    "The elephants' trunks are intertwined.",
    "A man doesn't look happy about his hot dog.",
    "Kids can't wait to open their presents.",
    'An airplane flying through a clear blue sky at 5:30 p.m.',
    'A bowl of fruit: apples, bananas, and oranges.',
    'A baseball player (number 24) sliding into home plate.',
    'A laptop, a mouse and a keyboard on a desk',
    "Two teddy bears sitting on a shelf, one's pink and one's blue.",
    "Mr. Smith's old pickup truck parked in front of a barn.",
    'A sign for St. Louis Ave. on a pole.',
    'A "No Smoking" sign in a restaurant.',
    'A giraffe that is 18 feet tall eating leaves.',
    'A 1/2 eaten donut next to a cup of coffee.',
    'Bananas cost $1.99 per lb at the market.',
    'There are 3 people; 2 are sitting, 1 is standing.',
    "A woman's purse sitting on a chair.",
    'a young man is doing a trick on his skateboard',
    'A man on skis poses for a picture in the snow.',
    'The bus is red, white, and blue.',
    "A dog with a frisbee in it's mouth.",
    'Its a small bathroom with a pedestal sink',
    'THERE IS A MAN ON A HORSE',
    'A tennis player swings his racket at the ball.',
    'A boat docked at a pier on a lake',
    'Someone is holding a hot-dog w/ mustard.',
    'A surfer rides a big wave... Wow!',
    'A person is cross-country skiing through the woods.',
    'A vase filled with red & yellow tulips.',
    'Children play soccer on a field -- one kicks the ball.',
    'A man holds a Wii remote controller.',
    'Two people sitting on a bench near a lake, looking at the sunset.',
    'A firetruck (red) parked on the side of the road.',
    'A cow standing in a field of tall grass',
    'A bird perched on a branch of a tree.',
    'Old men playing chess in the park .',
    'A woman riding a horse-drawn carriage.',
    'The motorcycle is parked next to the car',
    'A train on the tracks at the train station',
    "The view from inside an airplane's window.",
    'An orange tabby cat sleeping on a bed.',
    'A teddy bear wearing a bow-tie.',
    'A banana, an apple, and an orange.',
    'A kitchen that has a stove, a refrigerator and a microwave in it.',
    'A skier is going down a steep hill!',
    'A bunch of people are standing around outside',
    'A child is eating a piece of cake with a fork',
    "This is a picture of a man's desk with two monitors.",
    'The bear is walking in the water',
    'A yellow school bus parked on the side of a road',
    'A woman with a tennis racquet on a clay court',
    'A group of kids playing baseball in a field.',
    'A white plate topped with a sandwich and chips',
    'A table topped with plates of food and glasses of wine',
    'A man holding a kite in a large grassy area.',
    'Cars are stopped at a red light at an intersection',
    'Two dogs playing tug-of-war with a rope',
    'A large passenger jet sitting on top of an airport tarmac.',
    'A living room filled with furniture and a flat screen TV.',
    'A couple of people that are on a beach with kites',
    'A person on a snowboard in the air over snow',
    'A woman is eating a slice of pizza',
    'An elephant is standing by a tree',
    "People are gathered around a big display of T.V.'s",
    'A traffic light hanging over a street next to buildings.',
    'The little boy is wearing a baseball cap & glove.',
    'A bathroom that has a sink & mirror.',
    "a clock that says it is 3 o'clock",
    'A picture of an old-time locomotive.',
    "There's a large mirror above the sink.",
    'Those are some very tall giraffes!',
    'How many horses are in this picture?',
    'A man hitting a tennis ball with a racket.',
    'Some food is on a plate, next to a glass of O.J.',
    'A young boy in a blue shirt is playing with a ball',
    'A street sign says "Broadway" and "W 42 St".',
    'The U.S. flag flying over a building.',
    'A dog on a leash near a fire-hydrant.',
    'a red and white sign says stop',
    "A black dog laying in the grass with it's toy.",
    'A bunch of broccoli sitting on a table.',
    'The girls are sharing an umbrella under the rain.',
    'Motorcycles lined up in a parking lot.',
    'A skateboarder is doing a kick-flip at the park.',
    'A bed with a white comforter and pillows',
    'A cat is sitting in a bathroom sink.',
    'A man riding a bike down a city street.',
    'Two women are standing in the kitchen cooking',
    'A person flying a kite on a beach',
    'A desk with a computer, keyboard, and mouse.',
    'Multiple trains sitting on the tracks at a train yard.',
    'A busy city street filled with lots of traffic.',
    'A horse and rider jump over an obstacle.',
    'A man cutting a cake with a knife',
    'A boy in a Santa hat.',
    'The toilet seat is up.',
    'A hotdog with ketchup and mustard on a paper plate.',
    'A bus is driving down the road',
    'Some sheep in a pen at a farm',
    "Here's a photo of a sunset over the ocean.",
    "We're looking at a couple of zebras.",
    "They've set up a tent in the woods.",
    "You'll see an elephant walking by.",
    "I'd say this is a giraffe.",
    "A man's and a woman's bicycles.",
    "The '80s style van is parked.",
    "Rock 'n' roll band playing on a stage.",
    "Y'all look at that cat!",
    'Gonna be a great day for surfing.',
    'I wanna ride that horse.',
    'Lemme see that pizza.',
    'A person who cannot see is petting a dog.',
    "The dog ain't happy.",
    "A woman wearing a jacket that's too big.",
    "The kids'll love this playground.",
    "the boy's parents watch from the side-lines.",
    '3 dogs running in the snow',
    'About 20 people are waiting for a bus.',
    'A pair of scissors; a roll of tape.',
    'An ice cream cone (vanilla) on a hot day.',
    'A group of men in suits & ties.',
    'Broccoli, carrots, and cauliflower are in the bowl.',
    'A jumbo jet taking off from a runway.',
    'A pot of soup on a gas stove top.',
    'It is a man playing Wii.',
    'A woman plays the Nintendo Wii.',
    'Two cats laying on a couch, sleeping.',
    'The person is snowboarding down the mountain.',
    'A sheep dog herding sheep...',
    'A clock on the side of a building at 12:45.',
    'A cake decorated with the number "50".',
    'People ride bikes on a 2-lane road.',
    'Several cows stand in a pasture; one is brown.',
    'A dining table set for 4 people',
    'Visitors watch a giraffe at a zoo',
    'A kitten is sitting inside of a shoe.',
    "A kid's bedroom with toys on the floor.",
    "The man's wearing a helmet.",
    'Tourists at the Eiffel Tower in Paris, France.',
    'A man with a beard is holding a Coca-Cola bottle.',
    'The 7-11 store has a parking lot.',
    'A 2x4 piece of wood on the ground.',
    'A very tall man standing next to a very short man.',
    'A bowl of cereal & milk with a spoon.',
    'A refrigerator covered with magnets, photos, etc.',
    'A man holding a surf board on a beach.',
    'The sky is blue-ish and cloudy.',
    'There is a man, a woman, and a child.',
    'A guy in a blue t-shirt flipping burgers.',
    'A dog wearing a Halloween costume',
    'Two bicycles locked to a pole near the sidewalk.',
    'A bus stop with a bench and a trash can',
    'An old woman sits on a park bench & feeds birds.',
    'A pizza pie with lots of toppings on it',
    'Boats docked in the harbor at dusk',
    'A young boy brushing his teeth in the bathroom.',
    'The train is going over a bridge.',
    "A stuffed animal sitting on a person's lap.",
    'A green traffic sign that says "I-95 North".',
    'The man is skateboarding ... on a rail.',
    "An elephant's trunk is raised.",
    'People are sitting under umbrellas at the beach',
    'A man flying through the air while riding a skateboard.',
    'The hot dog has relish, onions, & ketchup.',
    'A flock of birds flying over the water',
    'A man in a wet suit carrying a surf board.',
    'A surfer wiping out on a wave!!',
    'A group of people on horseback.',
    'A bench in a park covered in snow.',
    "There're two dogs in the yard.",
    "An elephant with tusks (it's huge).",
    'A laptop computer sitting on top of a wooden desk.',
    'a slice of pizza w/ pepperoni',
    'A giraffe bending down to eat grass .',
    'A CAT SITTING ON A TOILET',
    'A sign: "Welcome to the Jungle!"',
    'A sandwich -- half eaten -- on a plate.',
    'A 3-tier wedding cake with flowers',
    'Two people at a Dr. office waiting room.',
    'A plane flies over the mountains of Colo.',
    'The train leaves at 10 a.m. today.',
    "A photo from the 1950's of a family.",
    'The kids are aged 5-7 years.',
    'This is an IKEA kitchen.',
    'A tv, dvd player & vcr.',
    'The cat is named "Mr. Whiskers".',
    'The pizza is 50% eaten.',
    'A dog sits next to a #2 pencil.',
    'A baseball game between the Red Sox and the N.Y. Yankees.',
    "Ben & Jerry's ice cream in a freezer.",
    'The AT&T building in downtown.',
    "A McDonald's sign lit up at night.",
    'The colour grey is my favourite. Colour neighbour honour',
    "It's a dog's life, don't you think? Can't won't I'm they're we've I'll he'd",
    "cannot gonna wanna gotta lemme gimme 'tis 'twas",
    'A black-and-white photo -- with a - dash.',
    '3.5 1,000 10:30 1/2 $5 £5 €5 ½',
    '"quoted" \'single\' `tick\'',
    '(paren) [bracket] {brace} <angle>',
    'Tom & Jerry &amp; AT&T',
    "Mr. Smith went to the U.S. on St. Patrick's day etc.",
    'A man... and a dog…',
    "curly ’quotes’ “double” dogs' bowls o'clock rock'n'roll",
    'a*b 2x4 #hashtag @user www.google.com http://x.com/a :) ;-)',
    'A well-known x-ray of a T-shirt on a 2-year-old in mid-air.',
    'The score was 5-10 and -5 degrees, a - b, word- and -word 4-way',
    'a dog.A cat went home.Then U.S.A. and St. Louis Dr. Who vs. them No. 5 i.e. e.g. 3 p.m. today',
    'Wait.. what.... ok?! yes!!! no?',
    "dogs' 'the '90s rock 'n' roll ma'am y'all O'Neil 'em jack-o'-lantern",
    'Two hot dogs w/ ketchup and/or mustard @ the 3rd St. market',
    'A 1950\'s car. The 1990s style. A 10\' tall giraffe and 6\'2" man',
    "a mom & pop shop, Ben&Jerry's, A&W root beer, Q&A",
    '100% of 5.5x zoom #1 $3.50 €20 1st 2nd 3rd 4th',
    'he said "hi" and \'bye\' to "Bob."',
    "I'm. You're. Can't.",
    'A red,white and blue flag;blue sky',
    'A train at 10:30am.',
    'It is 5°C and 2015-06-01T10:20:30Z',
    'a photo.jpg shown here',
    'U.S. The dog',
    'Go to Co. Ltd now and Pty. Ltd.',
    'Ms. 5 Fig. 3 fig.3 approx. 5',
    'He is 6-foot-2 and 3-D and e-mail re-do co-op',
    'well.,done U.S., then',
    '5 7/8 inch and 1 1/2 and 3/4',
    '(555) 123-4567 and 555-123-4567',
    'a --- b ---- c ----- d — e – f',
    'o’clock d’Avignon O’Neil rock’n’roll ‘em ’90s ’n’',
    'café naïve Zoë façade',
    'a ☺ ★ ♥ × ±',
    '中文 字',
    'tab\there  two  spaces ',
    '  leading and trailing  ',
    'a ...... b ........ c . . . d',
    'x etc.',
    'I. The dog',
    'Sold by Co.',
]

# Fragments glued at random, with and without spaces between them: every boundary case of
# the lexer's rules (quotes next to words, abbreviations before capitals, e-mail and URL
# shapes, numbers next to letters) in a few thousand lines.
FRAGMENTS = [
    "a", "A", "dog", "Dog", "it", "'s", "'", '"', "n't", "do", "ca", "can", "wo", "I", "'m", "'re", "'ve", "'ll", "'d",
    ".", ",", ";", ":", "!", "?", "...", "-", "--", "(", ")", "[", "]", "{", "}", "&", "&amp;", "/", "*", "#", "$", "%",
    "@", "5", "10", "3.5", "1,000", "1/2", "10:30", "2nd", "-5", "x", "U.S.", "Mr.", "St.", "etc.", "e.g.", "i.e.",
    "p.m.", "well-known", "T-shirt", "o'clock", "rock", "and", "the", "The", "black", "white", "ice", "cream", "café",
    "½", "—", "’", "“", "”", "‘", "Inc.", "No.", "Fig.", "vs.", "co-op", "e-mail", "A&W", "AT&T", "www.coco.org",
    "cannot", "gonna", "'90s", "'em", "ma'am", "y'all", "O'Neil", "dogs'", "TV's", "2x4", "#1", "c++", ":)", "°", "×",
    "±", "<b>", "<", ">", "'t", "'T", "N'T", "IT'S", "DON'T", "hot-dog", "mid-air", "pre-war", "re-do", "um", "Ltd.",
    "Jan.", "Ave.", "ave", "St", "..", "....", "!!", "?!", "''", "``", "`", "=", "+", "~", "_", "^", "|", "\\", "e", "D",
    "P", "O", "s", "t", "n", "ll", "http://a.b/c", "x@y.com", "red,", "dog.", "Dog,", "ftp://q", "way:", "A.",
    "red,white-ish", "v.", "Mr", "co.", "pty.", "ltd", "d'", "l'", "’s", "´", "&quot;", "&lt;", "&gt;", "¼", "\u00a0",
    "\t",
]


def random_lines(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        text = "".join(rng.choice(FRAGMENTS) + rng.choice([" ", " ", " ", "", "  "]) for _ in range(rng.randint(1, 10)))
        lines.append(text.rstrip() if rng.random() < 0.7 else text)
    return lines


def java_tokenize(captions_for_image):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions_for_image.items()})


def grouped(lines, size):
    return {f"image{i}": lines[i:i + size] for i in range(0, len(lines), size)}


# -- tokenisation ------------------------------------------------------------------------------

def test_tokenizer_matches_pycocoevalcap_on_captions():
    data = grouped(CAPTIONS, 5)
    assert ptb.tokenize(data) == java_tokenize(data)


def test_tokenizer_matches_pycocoevalcap_on_random_text():
    data = grouped(random_lines(seed=0, count=3000), 3)
    ours, java = ptb.tokenize(data), java_tokenize(data)
    differ = [(data[k], ours[k], java[k]) for k in data if ours[k] != java[k]]
    assert not differ, differ[:5]


@pytest.mark.parametrize("caption, tokens", [
    ("A man with a red helmet on a small moped on a dirt road. ", "a man with a red helmet on a small moped on a dirt road"),
    ("It's a dog's life, don't you think?", "it 's a dog 's life do n't you think"),
    ("I can't believe they're gonna win!", "i ca n't believe they 're gon na win"),
    ("A black-and-white photo of a 2-year-old.", "a black-and-white photo of a 2-year-old"),
    ('A sign that says "STOP" (in red).', "a sign that says stop -lrb- in red -rrb-"),  # sic: -lrb- survives
    ("Mr. Smith's [old] pickup... at 5:30 p.m.", "mr. smith 's -lsb- old -rsb- pickup at 5:30 p.m."),
    ("Ben & Jerry's ice cream costs $3.50 & up", "ben & jerry 's ice cream costs $ 3.50 & up"),
    ("The U.S. The end etc.", "the u.s. the end etc."),
    ("", ""),
    ("...!?", "!?"),  # sic: "!?" is one token, and not in pycocoevalcap's punctuation list
])
def test_tokenize_examples(caption, tokens):
    assert ptb.tokenize_caption(caption) == tokens
    assert ptb.tokenize({"x": [caption]}) == {"x": [tokens]}


def test_line_breaks_inside_a_caption_stay_inside_it():
    # pycocoevalcap replaces "\n" only; a "\r" moves every later caption to the wrong image.
    out = ptb.tokenize({1: ["a dog\r\non grass", "a cat\rsleeping"], 2: ["a bird\u2028flying"]})
    assert out == {1: ["a dog on grass", "a cat sleeping"], 2: ["a bird flying"]}


def test_tokenize_accepts_coco_annotation_dicts():
    assert ptb.tokenize({7: [{"caption": "A Dog."}, "A cat!"]}) == {7: ["a dog", "a cat"]}


# -- scores --------------------------------------------------------------------------------------

def random_corpus(seed: int, images: int = 200):
    rng = random.Random(seed)
    refs = {i: rng.sample(CAPTIONS, rng.randint(1, 6)) for i in range(images)}
    hyps = {}
    for i in range(images):
        roll = rng.random()
        hyps[i] = refs[i][0] if roll < 0.3 else rng.choice(CAPTIONS) if roll < 0.9 else rng.choice(["", "a", "a a a a"])
    return refs, hyps


def pycocoevalcap_scores(gts, res):
    """pycocoevalcap's scorers on tokenised {image: [refs]} and {image: [hyp]}."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    out, per = {}, {}
    score, scores = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        out[f"Bleu_{n + 1}"], per[f"Bleu_{n + 1}"] = score[n], scores[n]
    for name, scorer in (("ROUGE_L", Rouge()), ("CIDEr", Cider())):
        out[name], per[name] = scorer.compute_score(gts, res)
    return out, {name: dict(zip(gts, values)) for name, values in per.items()}


def assert_same_scores(ours, java, java_per_image):
    for name, value in java.items():
        assert ours["metrics"][name] == pytest.approx(value, abs=1e-6, rel=0), name
        for key, per in java_per_image[name].items():
            assert ours["per_image"][key][name] == pytest.approx(per, abs=1e-6, rel=0), (name, key)


def test_scores_match_pycocoevalcap_each_with_its_own_tokenizer():
    refs, hyps = random_corpus(seed=1)
    gts, res = java_tokenize(refs), java_tokenize({k: [v] for k, v in hyps.items()})
    java, java_per_image = pycocoevalcap_scores(gts, res)
    ours = cm.score_captions(refs, hyps, java=False)
    assert_same_scores(ours, java, java_per_image)
    assert ours["metrics"]["METEOR"] is None and ours["metrics"]["SPICE"] is None


def test_scores_match_pycocoevalcap_on_the_same_tokens():
    refs, hyps = random_corpus(seed=2)
    gts = {k: [ptb.tokenize_caption(c) for c in v] for k, v in refs.items()}
    res = {k: ptb.tokenize_caption(v) for k, v in hyps.items()}
    # corner cases: empty and one-word hypotheses, repeated words (clipping), a hypothesis
    # exactly between two reference lengths (BLEU's closest length picks the shorter)
    gts.update({"empty": ["a dog runs"], "one": ["dog", "a dog"], "repeat": ["the the cat", "a cat"],
                "tie": ["a b", "a b c d"], "long": ["a cat"]})
    res.update({"empty": "", "one": "dog", "repeat": "the the the the", "tie": "a b c", "long": "a cat " * 20})
    java, java_per_image = pycocoevalcap_scores(gts, {k: [v] for k, v in res.items()})
    assert_same_scores(cm.score_captions(gts, res, java=False, tokenized=True), java, java_per_image)


def test_scores_by_hand():
    refs = {"dog.jpg": ["A dog runs.", "A dog is running."], "cat.jpg": ["A cat sleeps."]}
    hyps = {"dog.jpg": "a dog runs", "cat.jpg": "a bird flies"}
    out = cm.score_captions(refs, hyps, java=False)["metrics"]
    # BLEU-1: 3 + 1 of 6 words match; hypothesis and closest references both 3 + 3 words long
    assert out["Bleu_1"] == pytest.approx(4 / 6, abs=1e-6)
    # ROUGE-L: 1 for the dog; for the cat one word of three both ways, F = 1/3
    assert out["ROUGE_L"] == pytest.approx((1 + 1 / 3) / 2)
    # CIDEr-D: "a" is in both images' references, so weighs nothing; the cat scores 0. The dog
    # matches reference 1 exactly (1 for 1- to 3-grams, no 4-grams) and reference 2 with cosine
    # 1/sqrt(6) on 1- and 2-grams, one bigram shorter: penalty exp(-1/72).
    dog = 10 * (3 + 2 / math.sqrt(6) * math.exp(-1 / 72)) / 4 / 2
    assert out["CIDEr"] == pytest.approx(dog / 2)


def test_meteor_matches_pycocoevalcap():
    from pycocoevalcap.meteor.meteor import Meteor

    refs, hyps = random_corpus(seed=3, images=25)
    gts = {k: [ptb.tokenize_caption(c) for c in v] for k, v in refs.items()}
    res = {k: ptb.tokenize_caption(v) or "a" for k, v in hyps.items()}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:  # both JVMs load METEOR's tables at the same time
        mine = pool.submit(cm.meteor, gts, res)
        java, java_per_image = Meteor().compute_score(gts, {k: [v] for k, v in res.items()})
        ours, per_image = mine.result()
    assert ours == pytest.approx(java, abs=1e-6)
    assert [per_image[k] for k in gts] == pytest.approx(java_per_image, abs=1e-6)


def test_java_metrics_unavailable_without_java(monkeypatch):
    monkeypatch.setattr(cm.shutil, "which", lambda name: None)
    status = cm.java_metrics_status()
    assert "Java" in status["METEOR"] and "Java" in status["SPICE"]
    out = cm.score_captions({1: ["a dog"]}, {1: "a dog"})
    assert out["metrics"]["METEOR"] is None and "Java" in out["unavailable"]["METEOR"]
    assert out["metrics"]["CIDEr"] is not None


def test_java_metrics_unavailable_without_pycocoevalcap(monkeypatch):
    monkeypatch.setattr(cm, "_pycocoevalcap_dir", lambda: None)
    assert all("pycocoevalcap" in reason for reason in cm.java_metrics_status().values())
    with pytest.raises(RuntimeError, match="METEOR unavailable"):
        cm.meteor({1: ["a dog"]}, {1: "a dog"})


def test_spice_needs_the_corenlp_models(monkeypatch, tmp_path):
    (tmp_path / "meteor").mkdir()
    (tmp_path / "meteor" / "meteor-1.5.jar").write_bytes(b"")
    (tmp_path / "spice" / "lib").mkdir(parents=True)
    (tmp_path / "spice" / "spice-1.0.jar").write_bytes(b"")
    monkeypatch.setattr(cm, "_pycocoevalcap_dir", lambda: tmp_path)
    status = cm.java_metrics_status()
    assert status["METEOR"] is None and "CoreNLP 3.6.0" in status["SPICE"]
    (tmp_path / "spice" / "lib" / "stanford-corenlp-3.6.0.jar").write_bytes(b"")
    (tmp_path / "spice" / "lib" / "stanford-corenlp-3.6.0-models.jar").write_bytes(b"")
    assert cm.java_metrics_status()["SPICE"] is None


def test_references_and_hypotheses_must_cover_the_same_images():
    with pytest.raises(ValueError, match="different images"):
        cm.bleu({1: ["a"], 2: ["b"]}, {1: "a"})
    with pytest.raises(ValueError, match="non-empty list"):
        cm.cider_d({1: []}, {1: "a"})
