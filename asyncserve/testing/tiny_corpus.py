"""Training text for the tiny tokenizers in `asyncserve.testing.tiny_model`.

Varied English (prose, dialogue, code, numbers, markup) and other scripts, so
that the trained vocabularies hold common English pieces while rarer
multi-byte characters stay split over several tokens. Changing this text
changes every tiny tokenizer: bump `tiny_model.DEFAULT_MODEL_VERSION` with it.
"""

CORPUS = r"""
The quick brown fox jumps over the lazy dog. The dog does not seem to mind.
Once upon a time, in a small village by the sea, there lived an old fisherman
who went out every morning before the sun was up. He knew the names of the
winds and the colours of the water, and he could tell from the gulls whether
the day would bring fish or storms. His daughter kept the accounts of the
boat: nets mended, fuel bought, fish sold at the market on Tuesday and Friday.
"Where are you going?" she asked him one grey morning.
"Out past the lighthouse," he said. "The mackerel are running."
"Then take the new net, and come back before the tide turns."
He laughed, because she always said the same thing, and because she was right.

A language model predicts the next token given the tokens before it. During
serving, the prompt is processed in one pass (the prefill), and then tokens are
generated one at a time (the decode). The keys and values of every attention
layer are kept in a cache so that each new token only attends to what was
already computed. A paged cache splits that memory into fixed-size blocks, so
that many requests can share one pool without fragmentation. Continuous batching
adds new requests to the running batch at every step instead of waiting for
the whole batch to finish. Throughput is measured in tokens per second; latency
is measured as the time to the first token and the time between tokens.

Questions and answers:
Q: What is the capital of France? A: Paris.
Q: How many days are there in a leap year? A: 366.
Q: What is 12 times 12? A: 144.
Q: Who wrote "Pride and Prejudice"? A: Jane Austen, in 1813.
Q: Is water wet? A: That depends on what you mean by "wet".

Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 2048 65536 3.14159 2.71828
-17 +5 1e-3 50% $19.99 #1 @home a&b x*y (a+b)/c [1, 2, 3] {"key": "value"}
Dates: 2024-01-15, 15/01/2024, January 15th, 1999. Times: 09:30, 23:59:59.

def fibonacci(n: int) -> int:
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

for i in range(10):
    print(f"fib({i}) = {fibonacci(i)}")

class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()

<html><body><p>Hello, <b>world</b>!</p></body></html>
SELECT name, count(*) FROM users WHERE age >= 18 GROUP BY name ORDER BY 2 DESC;
$ pip install --upgrade package && python -m pytest -q tests/

Recipes are simple programs for cooks. Take two eggs, a cup of flour, half a
cup of milk and a pinch of salt. Whisk the eggs with the milk, then fold in the
flour until the batter is smooth. Heat a pan with a little butter and pour in
a thin layer. Turn it over when the edges are golden. Serve warm with lemon
and sugar, or with cheese and ham if you prefer something savoury.

The weather today: cloudy in the morning, sunny in the afternoon, with a light
breeze from the west. Temperatures between 14 and 21 degrees. Tomorrow will be
wetter, so bring an umbrella. Last week it rained for five days in a row, and
the river rose higher than it had in ten years.

Dear team,
Thank you all for your hard work this quarter. We shipped three releases,
fixed over two hundred bugs, and our users noticed. Let's keep it up!
Best regards,
Alice

Café, naïve, résumé, façade, jalapeño, crème brûlée, Zürich, Ångström, São Paulo.
Où est la bibliothèque ? Je voudrais un café au lait, s'il vous plaît.
¿Dónde está la estación? Mañana vamos a la playa con los niños.
Schöne Grüße aus München! Die Straße ist heute sehr ruhig. Äpfel und Öl.
Dziękuję bardzo. Łódź jest dużym miastem. Čeština, slovenčina, hrvatski jezik.
Ελληνικά: Καλημέρα κόσμε. Η γλώσσα είναι όμορφη. Αλφα, βήτα, γάμμα, δέλτα.
Русский: Привет, мир! Как дела? Сегодня хорошая погода. Спасибо большое.
Українська: Добрий день! Дякую. Слава науці.
日本語: こんにちは世界。今日はいい天気ですね。ありがとうございます。
中文: 你好，世界！今天天气很好。我们一起去吃饭吧。谢谢你。
한국어: 안녕하세요. 만나서 반갑습니다. 감사합니다.
العربية: مرحبا بالعالم. شكرا جزيلا.
עברית: שלום עולם. תודה רבה.
हिन्दी: नमस्ते दुनिया। धन्यवाद।
ไทย: สวัสดีชาวโลก ขอบคุณครับ
Emoji: 😀 😂 🎉 👍 ❤️ 🚀 🌍 🐍 🍕 ✨ 👨‍👩‍👧 🇫🇷
Symbols: € £ ¥ © ® ™ ° ± × ÷ → ← ↑ ↓ ∞ ≈ ≠ ≤ ≥ √ ∑ π Ω µ … “quotes” ‘single’ — –

Short lines:
yes
no
maybe
OK.
Thanks!
See you tomorrow.
I don't know.
It's fine, isn't it? We'll see. They're here. You've got mail. I'd say so.

The library opens at nine and closes at six. On Sundays it is closed. Members
can borrow up to ten books at a time for three weeks. Late returns cost a small
fee, which goes toward buying new books. The reading room on the second floor
is quiet; please turn off your phone. Children's books are on the ground floor,
next to the garden, where story time happens every Saturday at eleven.

In mathematics, a prime number is a natural number greater than one that is not
a product of two smaller natural numbers. The first primes are 2, 3, 5, 7, 11,
13, 17, 19, 23 and 29. Euclid proved that there are infinitely many primes: if
there were only finitely many, their product plus one would have a prime factor
that is not in the list. The sum of the first n odd numbers is n squared.

Travel notes: the train left at 7:05 and arrived at 11:40. The mountains were
covered with snow, the lakes were still, and the villages looked like toys.
We stayed in a small hotel near the station; the breakfast was excellent.
"""
