//! The schema's two hand-kept mirrors stay true: `migrations/schema.sql` builds the same
//! database as the migrations, and `src/db/schema.rs` (diesel's `print-schema` output)
//! describes the tables, columns, keys and joins the migrated database has.

use diesel::QueryableByName;
use diesel::sql_types::Text;
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use flashsale::db;

use crate::support::TestDb;

/// The whole schema as written down.
const SCHEMA_SQL: &str = include_str!("../../migrations/schema.sql");
/// diesel's view of the tables.
const SCHEMA_RS: &str = include_str!("../../src/db/schema.rs");

/// One line of a catalog listing.
#[derive(QueryableByName)]
struct Line {
    #[diesel(sql_type = Text)]
    line: String,
}

/// Every table column, constraint, index, trigger and function of `public`, one line each,
/// sorted; diesel's own bookkeeping table left out.
const CATALOG: &str = "
SELECT line FROM (
    SELECT format('column %s.%s %s %s null=%s default=%s collate=%s', table_name, lpad(ordinal_position::text, 3, '0'),
                  column_name, data_type, is_nullable, column_default, collation_name) AS line
      FROM information_schema.columns
     WHERE table_schema = 'public' AND table_name <> '__diesel_schema_migrations'
    UNION ALL
    SELECT format('constraint %s %s %s', conrelid::regclass, conname, pg_get_constraintdef(oid))
      FROM pg_constraint
     WHERE connamespace = 'public'::regnamespace AND conrelid <> '__diesel_schema_migrations'::regclass
    UNION ALL
    SELECT format('index %s', indexdef) FROM pg_indexes
     WHERE schemaname = 'public' AND tablename <> '__diesel_schema_migrations'
    UNION ALL
    SELECT format('trigger %s', pg_get_triggerdef(oid)) FROM pg_trigger WHERE NOT tgisinternal
    UNION ALL
    SELECT format('function %s', pg_get_functiondef(oid)) FROM pg_proc
     WHERE pronamespace = 'public'::regnamespace
) catalog ORDER BY line";

/// The catalog listing of a database.
async fn catalog(conn: &mut AsyncPgConnection) -> Vec<String> {
    diesel::sql_query(CATALOG)
        .load::<Line>(conn)
        .await
        .expect("read the catalog")
        .into_iter()
        .map(|row| row.line)
        .collect()
}

#[tokio::test]
async fn schema_sql_builds_the_database_the_migrations_build() {
    let migrated = TestDb::new().await;
    // __diesel_schema_migrations exists only where migrations ran: create it in the copy too.
    let from_file = format!("{}_file", migrated.config().database().unwrap());
    let admin = migrated.config().with_database("postgres");
    let mut admin_conn = db::connect(&admin).await.unwrap();
    diesel::sql_query(format!(
        "CREATE DATABASE \"{from_file}\" TEMPLATE template0"
    ))
    .execute(&mut admin_conn)
    .await
    .unwrap();
    let mut file_conn = db::connect(&admin.with_database(&from_file)).await.unwrap();
    file_conn
        .batch_execute(SCHEMA_SQL)
        .await
        .expect("migrations/schema.sql applies to an empty database");
    file_conn
        .batch_execute("CREATE TABLE __diesel_schema_migrations (version text PRIMARY KEY)")
        .await
        .unwrap();
    let mut migrated_conn = db::connect(&migrated.config()).await.unwrap();

    let expected = catalog(&mut migrated_conn).await;
    let written = catalog(&mut file_conn).await;
    drop(file_conn);
    diesel::sql_query(format!("DROP DATABASE \"{from_file}\" WITH (FORCE)"))
        .execute(&mut admin_conn)
        .await
        .unwrap();

    assert!(
        expected.len() > 40,
        "the catalog listing looks empty: {expected:#?}"
    );
    let missing: Vec<&String> = expected.iter().filter(|l| !written.contains(l)).collect();
    let extra: Vec<&String> = written.iter().filter(|l| !expected.contains(l)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "migrations/schema.sql drifted from the migrations.\nonly in the migrated database: \
         {missing:#?}\nonly in schema.sql's database: {extra:#?}"
    );
}

/// A column as diesel's `table!` declares it: `table.column Type`.
#[derive(QueryableByName)]
struct Column {
    #[diesel(sql_type = Text)]
    table_name: String,
    #[diesel(sql_type = Text)]
    column_name: String,
    #[diesel(sql_type = Text)]
    udt_name: String,
    #[diesel(sql_type = Text)]
    is_nullable: String,
}

/// A table's primary key columns, or a foreign key as `child -> parent (column)`.
#[derive(QueryableByName)]
struct Key {
    #[diesel(sql_type = Text)]
    key: String,
}

/// The `table!` and `joinable!` lines `diesel print-schema` would write for the database:
/// columns in order with diesel's type names, the primary key, and one `joinable!` per pair
/// of tables joined by exactly one foreign key.
async fn print_schema(conn: &mut AsyncPgConnection) -> Vec<String> {
    let columns: Vec<Column> = diesel::sql_query(
        "SELECT table_name::text, column_name::text, udt_name::text, is_nullable::text
           FROM information_schema.columns
          WHERE table_schema = 'public' AND table_name <> '__diesel_schema_migrations'
          ORDER BY table_name, ordinal_position",
    )
    .load(conn)
    .await
    .unwrap();
    let keys: Vec<Key> = diesel::sql_query(
        "SELECT format('%s (%s)', c.conrelid::regclass,
                       string_agg(a.attname, ', ' ORDER BY k.position)) AS key
           FROM pg_constraint c
           CROSS JOIN unnest(c.conkey) WITH ORDINALITY AS k(attnum, position)
           JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
          WHERE c.contype = 'p' AND c.connamespace = 'public'::regnamespace
            AND c.conrelid <> '__diesel_schema_migrations'::regclass
          GROUP BY c.conrelid
         UNION ALL
         SELECT format('joinable!(%s -> %s (%s))', c.conrelid::regclass, c.confrelid::regclass, min(a.attname))
           FROM pg_constraint c JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
          WHERE c.contype = 'f' AND c.connamespace = 'public'::regnamespace
          GROUP BY c.conrelid, c.confrelid HAVING count(*) = 1",
    )
    .load(conn)
    .await
    .unwrap();
    let mut lines: Vec<String> = columns
        .into_iter()
        .map(|column| {
            let diesel_type = match column.udt_name.as_str() {
                "uuid" => "Uuid",
                "int8" => "Int8",
                "int4" => "Int4",
                "text" => "Text",
                "bool" => "Bool",
                "timestamptz" => "Timestamptz",
                "interval" => "Interval",
                other => panic!("no diesel type known for {other}: extend this test"),
            };
            let diesel_type = if column.is_nullable == "YES" {
                format!("Nullable<{diesel_type}>")
            } else {
                diesel_type.to_owned()
            };
            format!(
                "{}.{} -> {diesel_type}",
                column.table_name, column.column_name
            )
        })
        .collect();
    lines.extend(keys.into_iter().map(|key| key.key));
    lines.sort();
    lines
}

/// The same lines, read from `src/db/schema.rs`.
fn schema_rs_lines() -> Vec<String> {
    let mut lines = Vec::new();
    let mut table = None;
    for line in SCHEMA_RS.lines().map(str::trim) {
        if let Some(joinable) = line.strip_prefix("diesel::joinable!") {
            lines.push(format!("joinable!{}", joinable.trim_end_matches(';')));
        } else if let Some((name, rest)) = line.split_once(" (").filter(|_| line.ends_with('{')) {
            let key = rest.trim_end_matches(" {").trim_end_matches(')');
            lines.push(format!("{name} ({key})"));
            table = Some(name.to_owned());
        } else if let (Some(name), Some((column, diesel_type))) = (&table, line.split_once(" -> "))
        {
            lines.push(format!(
                "{name}.{column} -> {}",
                diesel_type.trim_end_matches(',')
            ));
        }
    }
    lines.sort();
    lines
}

#[tokio::test]
async fn schema_rs_describes_the_migrated_database() {
    let migrated = TestDb::new().await;
    let mut conn = db::connect(&migrated.config()).await.unwrap();
    let database = print_schema(&mut conn).await;
    let written = schema_rs_lines();
    assert!(
        written.len() > 40,
        "src/db/schema.rs parsed to too little: {written:#?}"
    );
    let missing: Vec<&String> = database.iter().filter(|l| !written.contains(l)).collect();
    let extra: Vec<&String> = written.iter().filter(|l| !database.contains(l)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "src/db/schema.rs drifted from the migrations (regenerate it with `diesel print-schema`).\n\
         only in the database: {missing:#?}\nonly in schema.rs: {extra:#?}"
    );
}
