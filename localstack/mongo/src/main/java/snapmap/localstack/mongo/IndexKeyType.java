package snapmap.localstack.mongo;

import java.lang.ref.ReferenceQueue;
import java.lang.ref.WeakReference;
import java.util.concurrent.ConcurrentHashMap;

import org.h2.mvstore.type.ObjectDataType;

import de.bwaldvogel.mongo.backend.KeyValue;

/**
 * The key type of the unique-index maps: H2's {@link ObjectDataType}, with the same bytes on
 * disk and the same key order, but each key serialised once instead of at every comparison.
 *
 * <p>The library opens an index map with the default key type, ObjectDataType. Its keys are
 * {@link KeyValue}s, which are Serializable but not Comparable, so H2 2.3.232 orders two of them
 * (in {@code ObjectDataType$SerializedObjectType.compare}) as follows: the same object is equal;
 * otherwise both are Java-serialised ({@link ObjectDataType#serialize}) and the two byte arrays
 * compared unsigned, byte by byte ({@link ObjectDataType#compareNotNull}). Every comparison
 * of a B-tree search serialised both keys again, which was most of the server's CPU time.
 *
 * <p>Here the order is computed by the same two library functions, but the serialised form of
 * each key object is kept, in a cache keyed by object identity that holds its keys weakly: a key
 * read from disk or put into the map is serialised the first time it is compared, a search key
 * once per search, and an entry goes when its key is garbage. This relies on a key not being
 * changed once it is in use, which the B-tree requires anyway: a stored key that changed would
 * no longer be where its order says. Anything that is not a KeyValue, and KeyValue itself should
 * a later library make it Comparable (then H2 would call compareTo), is compared by
 * ObjectDataType's own code, as before. Writing, reading and memory estimates are inherited
 * from ObjectDataType unchanged, so a store written with or without this type opens with the
 * other.
 */
final class IndexKeyType extends ObjectKeyType {

    /** H2 compares Comparable keys with compareTo, not by their bytes; KeyValue is not one. */
    private static final boolean BYTE_ORDERED = !Comparable.class.isAssignableFrom(KeyValue.class);

    private final SerialisedForms forms = new SerialisedForms();

    @Override
    public int compare(Object a, Object b) {
        if (BYTE_ORDERED && a instanceof KeyValue && b instanceof KeyValue) {
            if (a == b) {
                return 0;
            }
            return ObjectDataType.compareNotNull(forms.of(a), forms.of(b));
        }
        return super.compare(a, b);
    }

    /** The serialised form of each live key object, by identity; thread-safe. */
    private static final class SerialisedForms {

        private final ConcurrentHashMap<Identity, byte[]> bytes = new ConcurrentHashMap<>();
        private final ReferenceQueue<Object> collected = new ReferenceQueue<>();

        byte[] of(Object key) {
            byte[] form = bytes.get(new Lookup(key));
            if (form == null) {
                dropCollected();
                form = ObjectDataType.serialize(key);
                // A concurrent caller may have stored the same object's form first: same bytes.
                bytes.putIfAbsent(new Held(key, collected), form);
            }
            return form;
        }

        private void dropCollected() {
            for (Object held; (held = collected.poll()) != null; ) {
                bytes.remove(held);
            }
        }
    }

    /** A map key that matches another only when both stand for the same, still live, object. */
    private interface Identity {
        Object target();
    }

    /** A short-lived key for looking an object up. */
    private record Lookup(Object target) implements Identity {

        @Override
        public boolean equals(Object other) {
            return other instanceof Identity identity && identity.target() == target;
        }

        @Override
        public int hashCode() {
            return System.identityHashCode(target);
        }
    }

    /** The stored key: holds its object weakly, and is queued once the object is collected. */
    private static final class Held extends WeakReference<Object> implements Identity {

        private final int hash;

        Held(Object target, ReferenceQueue<Object> queue) {
            super(target, queue);
            hash = System.identityHashCode(target);
        }

        @Override
        public Object target() {
            return get();
        }

        @Override
        public boolean equals(Object other) {
            if (other == this) {
                return true;
            }
            Object target = get();
            return target != null && other instanceof Identity identity
                && identity.target() == target;
        }

        @Override
        public int hashCode() {
            return hash;
        }
    }
}
