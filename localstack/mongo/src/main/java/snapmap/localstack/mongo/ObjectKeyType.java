package snapmap.localstack.mongo;

import org.h2.mvstore.type.ObjectDataType;

/**
 * H2's {@link ObjectDataType} as a key type, with a {@code compare} that is safe to call from
 * several threads at once. Format, order and memory estimates are ObjectDataType's own.
 *
 * <p>An ObjectDataType remembers the type of the last value it handled, and in H2 2.3.232 its
 * comparison of two serialised (not built-in) values, such as two ObjectId or embedded-document
 * {@code _id}s, reads that memory twice and throws {@code UnsupportedOperationException: Can not
 * compare} when another thread changed it in between. The store's background thread does change
 * it, when it writes the keys of a collection whose {@code _id}s are of several types (a string
 * among ObjectIds, say), so an insert into such a collection could fail with "Unknown error".
 * Here each thread compares with an ObjectDataType of its own; the result of a comparison does
 * not depend on that memory, only the lookups it saves do.
 */
class ObjectKeyType extends ObjectDataType {

    private static final ThreadLocal<ObjectDataType> COMPARERS =
        ThreadLocal.withInitial(ObjectDataType::new);

    @Override
    public int compare(Object a, Object b) {
        return COMPARERS.get().compare(a, b);
    }
}
