//! Hand-written statements that stay prepared. diesel never caches `diesel::sql_query` nor
//! its own `UPDATE` statements (it cannot know their SQL is fixed), so each use prepares
//! the statement anew: a parse, a plan and one more round trip, on the paths that run most
//! (every hold batch, every settlement). A [`CachedSql`] is built only from `'static` SQL
//! pieces and typed binds, so its text is fixed where it is written, and diesel keeps it
//! prepared per connection, keyed by that text.

use diesel::QueryResult;
use diesel::expression::{AsExpression, TypedExpressionType};
use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{SqlType, Untyped};

/// One piece of the statement, in order.
enum Part<'a> {
    /// SQL text.
    Sql(&'static str),
    /// A value sent as the next bind parameter (`$n`).
    Bind(Box<dyn QueryFragment<Pg> + Send + 'a>),
}

/// A statement of fixed SQL with typed binds; load rows with `QueryableByName` types.
#[must_use = "queries are only executed when loaded or executed"]
pub struct CachedSql<'a> {
    /// SQL pieces and binds, in the order they appear.
    parts: Vec<Part<'a>>,
}

impl<'a> CachedSql<'a> {
    /// A statement starting with `sql`.
    pub fn new(sql: &'static str) -> Self {
        CachedSql {
            parts: vec![Part::Sql(sql)],
        }
    }

    /// Appends `value` as the next bind parameter, sent as SQL type `ST`.
    pub fn bind<ST, T>(mut self, value: T) -> Self
    where
        ST: SqlType + TypedExpressionType,
        T: AsExpression<ST>,
        T::Expression: QueryFragment<Pg> + Send + 'a,
    {
        self.parts.push(Part::Bind(Box::new(value.as_expression())));
        self
    }

    /// Appends more SQL text.
    pub fn sql(mut self, sql: &'static str) -> Self {
        self.parts.push(Part::Sql(sql));
        self
    }
}

impl QueryFragment<Pg> for CachedSql<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        for part in &self.parts {
            match part {
                Part::Sql(sql) => out.push_sql(sql),
                Part::Bind(bind) => bind.walk_ast(out.reborrow())?,
            }
        }
        Ok(())
    }
}

impl QueryId for CachedSql<'_> {
    type QueryId = ();
    /// Not static: diesel caches the statement by its SQL text instead.
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl Query for CachedSql<'_> {
    type SqlType = Untyped;
}
