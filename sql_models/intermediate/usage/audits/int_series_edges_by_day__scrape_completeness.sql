-- Series with a scrape gap longer than 15 minutes in the day (warning: usage is still exact).
/* audit
blocking: false
*/
with edges as (
    select * from int_series_edges_by_day
),

final as (
    select
        day,
        series_id,
        max_gap_ms,
        dropped_samples
    from edges
    where max_gap_ms > 900000
)

select * from final
