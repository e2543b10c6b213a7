import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, mkdirSync, readFileSync, rmSync, unlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  CorpusNotInstalledError,
  DataError,
  Sampler,
  type ShardSplit,
  assignSplits,
  countEvalDocuments,
  evalDocuments,
  loadCorpus,
  loadShards,
  makeSampler,
  makeTokenizer,
  prepareData,
  readKjv,
  readWeb,
  syntheticCorpus,
  syntheticDocument,
} from '../src/data/index.js';

const tmp = mkdtempSync(join(tmpdir(), 'ttt-data-test-'));
process.on('exit', () => rmSync(tmp, { recursive: true, force: true }));

describe('tokenizers', () => {
  test('byte: UTF-8 round trip (emoji, CJK, combining marks), ids fit in 256, BOS = 0', () => {
    const t = makeTokenizer('byte');
    assert.equal(t.name, 'byte');
    assert.equal(t.vocabSize, 256);
    assert.equal(t.bos, 0);
    const text = 'Héllo, wörld! 你好 🚀👩‍👩‍👧 e\u0301 \t\n\r end ~\u007f\u00ff\uffff 𝄞';
    const ids = t.encode(text);
    assert.deepEqual(ids, [...Buffer.from(text, 'utf8')]);
    assert.ok(ids.every((x) => x >= 1 && x < 256), 'BOS never produced');
    assert.equal(t.decode(ids), text);
    assert.equal(t.decode([t.bos, ...ids, t.bos]), text, 'decode drops BOS');
    assert.deepEqual(t.encode('a\u0000b'), [97, 32, 98], 'NUL is encoded as a space');
    assert.equal(t.decode([0xf0, 0x9f]), '\ufffd', 'a cut character decodes to U+FFFD');
    assert.equal(makeTokenizer(t.name).encode(text).join(), ids.join(), 'the saved name rebuilds the tokenizer');
    assert.throws(() => makeTokenizer('llama3'), /unknown tokenizer "llama3"/);
  });

  test('gpt2: prose round trip, BOS = <|endoftext|>, special text stays text', () => {
    const t = makeTokenizer('gpt2');
    assert.equal(t.vocabSize, 50257);
    assert.equal(t.bos, 50256);
    const prose = 'In the beginning God created the heaven and the earth. And the earth was without form, and void; “quoted” — dash… 🚀';
    const ids = t.encode(prose);
    assert.ok(ids.length < prose.length / 2, 'BPE compresses prose');
    assert.equal(t.decode(ids), prose);
    assert.deepEqual(t.encode('Hello world'), [15496, 995], "GPT-2's ids");
    const forged = t.encode('a <|endoftext|> b');
    assert.ok(!forged.includes(t.bos), 'the literal text cannot forge a document boundary');
    assert.equal(t.decode(forged), 'a <|endoftext|> b');
    assert.equal(t.decode([t.bos, ...ids]), prose);
  });
});

describe('synthetic corpus', () => {
  test('deterministic per (seed, index), exact lengths, independent of corpus size', () => {
    const a = syntheticDocument(5, { seed: 1, length: 2000 });
    assert.deepEqual(syntheticDocument(5, { seed: 1, length: 2000 }), a);
    assert.equal(a.text.length, 2000);
    assert.equal(Buffer.byteLength(a.text), 2000, 'ASCII: one byte per character');
    assert.notEqual(syntheticDocument(6, { seed: 1, length: 2000 }).text, a.text);
    assert.notEqual(syntheticDocument(5, { seed: 2, length: 2000 }).text, a.text);
    assert.deepEqual(syntheticCorpus({ seed: 1, numDocs: 8, length: 2000 })[5], a);
    const ranged = syntheticCorpus({ seed: 3, numDocs: 20, length: [512, 1024] });
    assert.ok(ranged.every((d) => d.text.length >= 512 && d.text.length <= 1024));
    assert.ok(new Set(ranged.map((d) => d.text.length)).size > 5);
  });

  test('facts: masked bytes are glossary values restated far from their last mention', () => {
    const minGap = 300;
    const d = syntheticDocument(0, { seed: 7, length: 8192, numFacts: 16, minGap });
    const values = new Map(d.facts.map((f) => [f.key, f.value]));
    let far = 0;
    let masked = 0;
    for (const f of d.facts) {
      assert.equal(d.text.slice(f.glossaryAt, f.glossaryAt + f.value.length), f.value);
      let last = f.glossaryAt;
      for (const m of f.mentions) {
        assert.ok(d.text.slice(0, m).endsWith(`${f.key} means `), 'the key announces the value');
        assert.equal(d.text.slice(m, m + f.value.length), f.value);
        assert.equal(values.get(f.key), f.value);
        assert.ok(m - last >= minGap, `restated ${m - last} bytes after its last mention`);
        if (m - f.glossaryAt > 4096) far++;
        last = m;
        for (let i = m; i < m + f.value.length; i++) assert.equal(d.factMask[i], 1);
        masked += f.value.length;
      }
    }
    assert.equal(d.factMask.reduce((s, x) => s + x, 0), masked, 'only restated values are masked');
    assert.ok(far >= 5, `facts reused more than 4096 bytes after the glossary (${far})`);
    assert.ok(masked > 100);
  });
});

describe('shards', () => {
  const synth = { numDocs: 40, length: [600, 1200] as [number, number], numFacts: 6, minGap: 100 };

  test('synthetic → byte shards: manifest, round trip, splits hold whole documents', () => {
    const out = join(tmp, 'synth');
    const m = prepareData({ source: 'synthetic', out, tokenizer: 'byte', seed: 3, valFraction: 0.1, testFraction: 0.1, synthetic: synth });
    assert.equal(m.dtype, 'uint16');
    assert.deepEqual(m.tokenizer, { name: 'byte', vocabSize: 256, bos: 0 });
    const s = loadShards(out);
    assert.deepEqual(s.manifest, m);
    const docs = syntheticCorpus({ seed: 3, ...synth });
    const byId = new Map(docs.map((d) => [d.id, d]));
    const seen = new Map<string, string>();
    for (const split of ['train', 'val', 'test'] as const) {
      const sp = s.splits[split];
      assert.equal(sp.tokens.length, m.splits[split].tokens);
      assert.ok(sp.documents.length >= (split === 'train' ? 30 : 4), `${split} has ${sp.documents.length} documents`);
      for (const d of sp.documents) {
        assert.ok(!seen.has(d.id), `${d.id} is in ${seen.get(d.id)} and ${split}`);
        seen.set(d.id, split);
        const src = byId.get(d.id)!;
        assert.equal(s.tokenizer.decode(sp.tokens.subarray(d.start, d.start + d.length)), src.text);
        assert.deepEqual([...sp.factMask!.subarray(d.start, d.start + d.length)], [...src.factMask]);
      }
    }
    assert.equal(seen.size, 40);
    // The assignment is a function of the seed and the ids.
    const ids = docs.map((d) => d.id);
    assert.deepEqual(assignSplits(ids, 0.1, 0.1, 3), ids.map((id) => seen.get(id)));
    assert.notDeepEqual(assignSplits(ids, 0.1, 0.1, 4), assignSplits(ids, 0.1, 0.1, 3));
    assert.deepEqual(assignSplits(ids.slice(0, 3), 0.01, 0.01, 0).sort(), ['test', 'train', 'val']);
  });

  test('gpt2 shards carry the fact mask over to BPE tokens', () => {
    const out = join(tmp, 'synth-gpt2');
    prepareData({ source: 'synthetic', out, tokenizer: 'gpt2', seed: 3, synthetic: { ...synth, numDocs: 4 }, valFraction: 0, testFraction: 0 });
    const s = loadShards(out);
    assert.equal(s.manifest.dtype, 'uint16');
    const sp = s.splits.train;
    const d = sp.documents[0];
    const masked = [...sp.tokens.subarray(d.start, d.start + d.length)].filter((_, i) => sp.factMask![d.start + i]);
    const src = syntheticDocument(Number(d.id.split('/')[2]), { seed: 3, ...synth });
    for (const f of src.facts) if (f.mentions.length) assert.ok(s.tokenizer.decode(masked).includes(f.value));
  });

  test('loadShards: one clear line for each way a directory can be broken', () => {
    const out = join(tmp, 'broken');
    prepareData({ source: 'synthetic', out, tokenizer: 'byte', synthetic: { ...synth, numDocs: 6 } });
    const fails = (re: RegExp) =>
      assert.throws(() => loadShards(out), (e: Error) => e instanceof DataError && re.test(e.message) && !e.message.includes('\n'));
    assert.throws(() => loadShards(join(tmp, 'nope')), /data directory not found: .*nope/);

    const bin = join(out, 'train.bin');
    const good = readFileSync(bin);
    const bad = Buffer.from(good);
    bad[17] ^= 1;
    writeFileSync(bin, bad);
    fails(/checksum mismatch: .*train\.bin/);
    writeFileSync(bin, good.subarray(0, good.length - 2));
    fails(/wrong size: .*train\.bin/);
    unlinkSync(bin);
    fails(/data file missing: .*train\.bin/);
    writeFileSync(bin, good);
    loadShards(out);

    const mpath = join(out, 'manifest.json');
    const manifest = readFileSync(mpath, 'utf8');
    writeFileSync(mpath, manifest.replace('"uint16"', '"int7"'));
    fails(/malformed manifest .*manifest\.json: dtype: /);
    writeFileSync(mpath, manifest.slice(0, 100));
    fails(/malformed manifest .*: not JSON/);
    const j = JSON.parse(manifest);
    j.splits.val.documents[0].start += 1;
    writeFileSync(mpath, JSON.stringify(j));
    fails(/malformed manifest .*splits\.val: document .* starts at/);
    unlinkSync(mpath);
    fails(/data file missing: .*manifest\.json/);
  });

  test('text:<path> sources: one document per .txt file', () => {
    const dir = join(tmp, 'texts');
    mkdirSync(join(dir, 'sub'), { recursive: true });
    writeFileSync(join(dir, 'a.txt'), '\ufeffFirst file.\r\nSecond line.');
    writeFileSync(join(dir, 'sub', 'b.txt'), 'Another 📚 document.');
    writeFileSync(join(dir, 'c.txt'), 'Third.');
    writeFileSync(join(dir, 'skip.md'), 'not text');
    const c = loadCorpus(`text:${dir}`);
    assert.deepEqual(c.documents.map((d) => d.id), ['a.txt', 'c.txt', 'sub/b.txt']);
    assert.equal(c.documents[0].text, 'First file.\nSecond line.');
    const out = join(tmp, 'text-shards');
    prepareData({ source: `text:${dir}`, out, tokenizer: 'byte', valFraction: 0.3, testFraction: 0.3 });
    const s = loadShards(out);
    assert.equal(s.manifest.source.name, `text:${dir}`);
    assert.deepEqual(['train', 'val', 'test'].map((k) => s.splits[k as 'train'].documents.length), [1, 1, 1]);
    assert.equal(loadCorpus(`text:${join(dir, 'c.txt')}`).documents[0].text, 'Third.');
    assert.throws(() => loadCorpus('text:/no/such/path'), /does not exist/);
    assert.throws(() => loadCorpus('gutenberg'), /unknown data source "gutenberg"/);
  });

  test('KJV (Debian bible-kjv): shards from the installed text, or the install command', () => {
    let kjv;
    try {
      kjv = readKjv();
    } catch (e) {
      assert.ok(e instanceof CorpusNotInstalledError, String(e));
      console.log(`# KJV not installed here; checked the error instead: ${(e as Error).message}`);
      assert.match((e as Error).message, /apt-get install bible-kjv/);
      return;
    }
    assert.equal(kjv.documents.length, 66);
    assert.equal(kjv.documents[0].title, 'Genesis');
    assert.match(kjv.documents[0].text, /^Genesis\n\nGenesis 1\n\n1 In the beginning God created the heaven and the earth\.\n/);
    assert.match(kjv.documents[65].text, /21 The grace of our Lord Jesus Christ be with you all\. Amen\.\n$/);
    const out = join(tmp, 'kjv');
    const m = prepareData({ source: 'kjv', out, tokenizer: 'byte', maxDocuments: 8, valFraction: 0.125, testFraction: 0.125 });
    assert.match(m.source.provenance, /bible-kjv/);
    const s = loadShards(out);
    const all = ['train', 'val', 'test'].flatMap((k) => s.splits[k as 'train'].documents.map((d) => d.title));
    assert.deepEqual(all.sort(), ['Deuteronomy', 'Exodus', 'Genesis', 'Joshua', 'Judges', 'Leviticus', 'Numbers', 'Ruth']);
    assert.throws(() => readKjv({ program: '/nonexistent/bible' }), /corpus "kjv" is not installed .*apt-get install bible-kjv/);
  });

  test('WEB (Debian sword-text-web): books from the SWORD module, or the install command', () => {
    let web;
    try {
      web = readWeb();
    } catch (e) {
      assert.ok(e instanceof CorpusNotInstalledError, String(e));
      console.log(`# WEB not installed here; checked the error instead: ${(e as Error).message}`);
      assert.match((e as Error).message, /apt-get install sword-text-web/);
      return;
    }
    const gen = web.documents.find((d) => d.title === 'Genesis')!;
    assert.match(gen.text, /Genesis 1\n\nIn the beginning, God created the heavens and the earth\./);
    assert.ok(web.documents.length >= 80);
    for (const d of web.documents) assert.ok(!/[<>\u0001]/.test(d.text), `markup left in ${d.id}`);
    assert.throws(() => readWeb({ dir: join(tmp, 'none') }), /corpus "web" is not installed .*apt-get install sword-text-web/);
  });
});

describe('packing', () => {
  // Four documents with recognisable tokens: document k holds 10k+1, 10k+2, ...
  const BOS = 0;
  const lengths = [3, 9, 1, 25];
  const tokens: number[] = [];
  const documents = lengths.map((length, k) => {
    const start = tokens.length;
    for (let i = 0; i < length; i++) tokens.push(100 * (k + 1) + i + 1);
    return { id: `d${k}`, title: `doc ${k}`, start, length };
  });
  const split: ShardSplit = { split: 'train', tokens: Uint16Array.from(tokens), documents, factMask: Uint8Array.from(tokens, (t) => (t % 2 ? 1 : 0)) };
  const stream: number[] = [];
  for (const d of documents) stream.push(BOS, ...tokens.slice(d.start, d.start + d.length));
  const bosAt = documents.map((_, k) => stream.indexOf(100 * (k + 1) + 1) - 1);

  const rows = (b: { batchSize: number; seqLen: number; tokens: Int32Array; targets: Int32Array; mask: Float32Array }) =>
    Array.from({ length: b.batchSize }, (_, r) => ({
      tokens: [...b.tokens.subarray(r * b.seqLen, (r + 1) * b.seqLen)],
      targets: [...b.targets.subarray(r * b.seqLen, (r + 1) * b.seqLen)],
      mask: [...b.mask.subarray(r * b.seqLen, (r + 1) * b.seqLen)],
    }));

  test('concat: sequences start at a document BOS, continue into the next documents, targets shifted by one', () => {
    const T = 8;
    const s = new Sampler(split, BOS, { seqLen: T, seed: 1 });
    assert.equal(s.epochLength, 4);
    const firsts = new Set<number>();
    for (const r of rows(s.next(8))) {
      assert.equal(r.tokens[0], BOS);
      const k = Math.floor(r.tokens[1] / 100) - 1;
      firsts.add(k);
      const cyc = [...stream, ...stream, ...stream];
      assert.deepEqual(r.tokens, cyc.slice(bosAt[k], bosAt[k] + T));
      assert.deepEqual(r.targets, cyc.slice(bosAt[k] + 1, bosAt[k] + T + 1));
      assert.deepEqual(r.mask, new Array(T).fill(1));
    }
    assert.equal(firsts.size, 4, 'each epoch visits every document once');
  });

  test('pad: one document per sequence, padding masked out', () => {
    const s = new Sampler(split, BOS, { seqLen: 6, seed: 2, pack: 'pad' });
    for (const r of rows(s.next(4))) {
      const k = Math.floor(r.tokens[1] / 100) - 1;
      const doc = tokens.slice(documents[k].start, documents[k].start + documents[k].length);
      const seq = [BOS, ...doc, ...new Array(7).fill(BOS)].slice(0, 7);
      assert.deepEqual(r.tokens, seq.slice(0, 6));
      assert.deepEqual(r.targets, seq.slice(1, 7));
      assert.deepEqual(r.mask, seq.slice(1, 7).map((_, j) => (j < doc.length ? 1 : 0)));
    }
  });

  test('chunks: long documents also start sequences every seqLen tokens', () => {
    const s = new Sampler(split, BOS, { seqLen: 8, seed: 0, starts: 'chunks' });
    // d1 (9 tokens) gets a second start; d3 (25 tokens) three more.
    assert.equal(s.epochLength, 4 + 1 + 3);
    const firstTokens = rows(s.next(8)).map((r) => r.tokens[0]).sort((a, b) => a - b);
    assert.deepEqual(firstTokens, [BOS, BOS, BOS, BOS, 208, 408, 416, 424]);
  });

  test('state/restore resumes with identical batches; mismatched options are refused', () => {
    const a = new Sampler(split, BOS, { seqLen: 5, seed: 9 });
    a.next(3);
    a.next(7);
    const saved = JSON.parse(JSON.stringify(a.state()));
    const expected = [a.next(5), a.next(6)];
    const b = new Sampler(split, BOS, { seqLen: 5, seed: 9 });
    b.restore(saved);
    assert.deepEqual([b.next(5), b.next(6)], expected);
    assert.notDeepEqual(new Sampler(split, BOS, { seqLen: 5, seed: 10 }).next(11).tokens, new Sampler(split, BOS, { seqLen: 5, seed: 9 }).next(11).tokens);
    assert.throws(() => new Sampler(split, BOS, { seqLen: 6, seed: 9 }).restore(saved), /seqLen=5 into a sampler with seqLen=6/);
  });

  test('evalDocuments: whole documents, BOS first, truncated to a context length', () => {
    const all = [...evalDocuments(split, BOS)];
    assert.equal(all.length, 4);
    assert.deepEqual([...all[1].inputs], [BOS, 201, 202, 203, 204, 205, 206, 207, 208]);
    assert.deepEqual([...all[1].targets], [201, 202, 203, 204, 205, 206, 207, 208, 209]);
    assert.deepEqual([...all[1].factMask!], [1, 0, 1, 0, 1, 0, 1, 0, 1]);
    const cut = [...evalDocuments(split, BOS, { contextLen: 9 })];
    assert.deepEqual(cut.map((d) => d.id), ['d1', 'd3']);
    assert.equal(countEvalDocuments(split, 9), 2);
    assert.deepEqual([...cut[1].targets], tokens.slice(documents[3].start, documents[3].start + 9));
    assert.equal([...evalDocuments(split, BOS, { contextLen: 2, maxDocuments: 1 })].length, 1);
  });

  test('sampler and evaluation over built shards', () => {
    const out = join(tmp, 'synth-pack');
    prepareData({ source: 'synthetic', out, tokenizer: 'byte', seed: 5, synthetic: { numDocs: 12, length: 700 } });
    const s = loadShards(out);
    const sampler = makeSampler(s, 'train', { seqLen: 256, seed: 0 });
    const b = sampler.next(4);
    const text = s.tokenizer.decode(b.tokens.subarray(0, 256));
    assert.match(text, /^Document \d+\. Glossary:\n/);
    const ev = [...evalDocuments(s.splits.test, s.manifest.tokenizer.bos, { contextLen: 700 })];
    assert.equal(ev.length, s.splits.test.documents.length);
    assert.ok(ev[0].factMask!.some((x) => x === 1));
    assert.ok(existsSync(join(out, 'train.mask.bin')));
  });
});
