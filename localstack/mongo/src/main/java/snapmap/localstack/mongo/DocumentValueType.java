package snapmap.localstack.mongo;

import java.nio.ByteBuffer;

import org.h2.mvstore.DataUtils;
import org.h2.mvstore.WriteBuffer;
import org.h2.mvstore.type.ObjectDataType;

import de.bwaldvogel.mongo.bson.Document;
import de.bwaldvogel.mongo.wire.BsonConstants;
import de.bwaldvogel.mongo.wire.bson.BsonDecoder;
import de.bwaldvogel.mongo.wire.bson.BsonEncoder;
import io.netty.buffer.ByteBuf;
import io.netty.buffer.Unpooled;

/**
 * The value type of a collection's documents map: each document is written as BSON, the
 * library's own wire encoding, instead of H2's {@link ObjectDataType}, which Java-serialises
 * it (class descriptors included, for every document).
 *
 * <p>Why: H2 keeps decoded pages in a cache of bounded size, and every page read from the file
 * again is decoded whole. With Java serialisation, decoding was most of the server's time
 * whenever a collection outgrew the cache: reading the 50,000 photos of one backfill page out
 * of 300,000, in index order, took 8-25 s, almost all of it in {@code ObjectInputStream}.
 *
 * <p>Format: a marker byte that no ObjectDataType value starts with (its tags end at 119), the
 * BSON length as a variable-length int, then the BSON. A value without the marker is read by
 * ObjectDataType, so a store written before this type opens with it; the documents it writes
 * are BSON, which a server built before this type cannot read. A document BSON cannot encode
 * (none the wire protocol delivers) is written the old way, and so is one larger than BSON's
 * 16 MB limit, which the library's decoder refuses: an update can grow a document past it (the
 * library does not check), and such a document written as BSON could not be read again, nor
 * the store opened. One written as BSON by the first build of this type is still read, its top
 * level without that limit (an embedded document over 16 MB is not).
 *
 * <p>Memory: H2 sizes its cache by each value's estimated memory. A decoded document takes
 * several times its BSON length in the heap (maps, entries, boxed values); the estimate is
 * {@link #HEAP_BYTES_PER_BSON_BYTE} times the running average length written or read, plus a
 * fixed part, and is not measured.
 */
final class DocumentValueType extends ObjectDataType {

    /** No ObjectDataType tag is this high (see the class comment). */
    private static final byte BSON_MARKER = (byte) 200;

    /** Heap bytes of a decoded document per byte of its BSON: an estimate (class comment). */
    static final int HEAP_BYTES_PER_BSON_BYTE = 5;
    private static final int HEAP_BYTES_FIXED = 64;

    /** Running average BSON length, updated without synchronisation (an estimate only). */
    private volatile int averageLength = 512;

    @Override
    public int getMemory(Object obj) {
        if (obj instanceof Document) {
            return HEAP_BYTES_PER_BSON_BYTE * averageLength + HEAP_BYTES_FIXED;
        }
        return super.getMemory(obj);
    }

    @Override
    public void write(WriteBuffer buff, Object obj) {
        byte[] bson = obj instanceof Document ? encode((Document) obj) : null;
        if (bson == null || bson.length > BsonConstants.MAX_BSON_OBJECT_SIZE) {
            super.write(buff, obj);
            return;
        }
        buff.put(BSON_MARKER).putVarInt(bson.length).put(bson);
        track(bson.length);
    }

    @Override
    public Object read(ByteBuffer buff) {
        if (buff.get(buff.position()) != BSON_MARKER) {
            return super.read(buff);
        }
        buff.get();
        int length = DataUtils.readVarInt(buff);
        ByteBuffer bson = buff.slice().limit(length);
        buff.position(buff.position() + length);
        track(length);
        if (length > BsonConstants.MAX_BSON_OBJECT_SIZE) {
            return decodeOversized(Unpooled.wrappedBuffer(bson));
        }
        return BsonDecoder.decodeBson(Unpooled.wrappedBuffer(bson));
    }

    /** A document over BSON's size limit, its top level read here and its values by the
     * library (see the class comment). */
    private static Document decodeOversized(ByteBuf buffer) {
        int end = buffer.readerIndex() + buffer.readIntLE() - 1;
        Document document = new Document();
        while (buffer.readerIndex() < end) {
            byte type = buffer.readByte();
            String name = BsonDecoder.decodeCString(buffer);
            document.put(name, BsonDecoder.decodeValue(type, buffer));
        }
        return document;
    }

    /** The document's BSON, or null when BSON cannot hold one of its values. */
    private static byte[] encode(Document document) {
        ByteBuf buffer = Unpooled.buffer();
        try {
            BsonEncoder.encodeDocument(document, buffer);
            byte[] bson = new byte[buffer.readableBytes()];
            buffer.readBytes(bson);
            return bson;
        } catch (RuntimeException e) {
            return null;
        } finally {
            buffer.release();
        }
    }

    private void track(int length) {
        averageLength = (length + 15 * averageLength) / 16;
    }
}
