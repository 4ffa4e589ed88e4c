//! Reading the guest's memory the way its CPU sees it: virtual addresses
//! translated through the guest's own page tables (4-level paging, 1 GiB,
//! 2 MiB and 4 KiB pages), and the kernel's call chain followed through its
//! RBP frame pointers.
//!
//! Everything read here was written by the guest and is untrusted: every
//! read is bounds-checked against guest RAM, every pointer is checked before
//! it is followed, chains are capped and loops cut; a bad value ends the
//! walk, it never panics.

use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

/// Guest physical memory, as the profiler reads it.
pub trait GuestPhys {
    /// Fills `buf` from guest physical address `gpa`; `false` when any of
    /// it is outside guest RAM.
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> bool;
}

impl GuestPhys for GuestMemoryMmap {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let Some(last) = gpa.checked_add(buf.len() as u64) else {
            return false;
        };
        if buf.is_empty() {
            return true;
        }
        // read_slice checks the range too; this keeps a read that spans
        // two regions (or runs past the end) from being partly done.
        self.address_in_range(GuestAddress(last - 1))
            && self.read_slice(buf, GuestAddress(gpa)).is_ok()
    }
}

/// A flat guest memory image starting at guest physical 0 (tests).
impl GuestPhys for [u8] {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let Ok(start) = usize::try_from(gpa) else {
            return false;
        };
        let Some(end) = start.checked_add(buf.len()) else {
            return false;
        };
        match self.get(start..end) {
            Some(src) => {
                buf.copy_from_slice(src);
                true
            }
            None => false,
        }
    }
}

const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
const PTE_PRESENT: u64 = 1;
const PTE_PS: u64 = 1 << 7;
/// Physical address bits 12..51 of a page-table entry (NX and the
/// protection-key and software bits above 51 masked off).
const PTE_ADDR: u64 = 0x000f_ffff_ffff_f000;
const PAGE_SIZE: u64 = 4096;

/// The control registers that say how the guest translates addresses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Paging {
    /// CR0 (PG: paging on).
    pub cr0: u64,
    /// CR3: the top-level page table (PCID bits ignored).
    pub cr3: u64,
    /// CR4 (PAE, LA57).
    pub cr4: u64,
    /// EFER (LMA: long mode active).
    pub efer: u64,
}

impl Paging {
    /// Paging off: virtual addresses are physical.
    pub fn off() -> Self {
        Self::default()
    }

    /// 4-level long-mode paging rooted at `cr3`.
    pub fn long_mode(cr3: u64) -> Self {
        Self {
            cr0: CR0_PG | 1,
            cr3,
            cr4: CR4_PAE,
            efer: EFER_LMA | (1 << 8),
        }
    }

    /// Whether the guest is in long mode (64-bit or compatibility).
    pub fn long_mode_active(&self) -> bool {
        self.efer & EFER_LMA != 0
    }
}

/// Why an address could not be translated (for tests and debugging).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Paging modes the profiler does not walk: 32-bit paging, PAE
    /// without long mode, 5-level paging.
    Unsupported,
    /// The address is not canonical (bits 63..47 differ).
    NonCanonical,
    /// An entry on the way is not present.
    NotPresent,
    /// A page table, or the final address, lies outside guest RAM.
    OutsideRam,
}

/// Translates guest virtual address `gva` with the guest's page tables.
pub fn translate<M: GuestPhys + ?Sized>(mem: &M, paging: &Paging, gva: u64) -> Result<u64, Fault> {
    if paging.cr0 & CR0_PG == 0 {
        return Ok(gva);
    }
    if paging.efer & EFER_LMA == 0 || paging.cr4 & CR4_PAE == 0 || paging.cr4 & CR4_LA57 != 0 {
        return Err(Fault::Unsupported);
    }
    // Canonical: bits 63..47 are copies of bit 47.
    let top = (gva as i64) >> 47;
    if top != 0 && top != -1 {
        return Err(Fault::NonCanonical);
    }
    let mut table = paging.cr3 & PTE_ADDR;
    // (level shift, whether a PS entry ends the walk here)
    for (shift, leaf_ok) in [(39u32, false), (30, true), (21, true), (12, true)] {
        let index = (gva >> shift) & 0x1ff;
        let mut raw = [0u8; 8];
        if !mem.read_phys(table + index * 8, &mut raw) {
            return Err(Fault::OutsideRam);
        }
        let entry = u64::from_le_bytes(raw);
        if entry & PTE_PRESENT == 0 {
            return Err(Fault::NotPresent);
        }
        if shift == 12 || (leaf_ok && entry & PTE_PS != 0) {
            let page_mask = (1u64 << shift) - 1;
            return Ok((entry & PTE_ADDR & !page_mask) | (gva & page_mask));
        }
        table = entry & PTE_ADDR;
    }
    Err(Fault::NotPresent)
}

/// Guest virtual memory of one vCPU at one moment: its page tables, and a
/// small cache of the pages translated so far (one sample's stack walk
/// reads a few words on the same one or two pages).
pub struct GuestView<'a, M: GuestPhys + ?Sized> {
    mem: &'a M,
    paging: Paging,
    cache: [(u64, u64); 4],
    next: usize,
}

impl<'a, M: GuestPhys + ?Sized> GuestView<'a, M> {
    /// A view through `paging`.
    pub fn new(mem: &'a M, paging: Paging) -> Self {
        Self {
            mem,
            paging,
            cache: [(u64::MAX, 0); 4],
            next: 0,
        }
    }

    /// The control registers this view translates with.
    pub fn paging(&self) -> &Paging {
        &self.paging
    }

    fn page(&mut self, gva_page: u64) -> Option<u64> {
        if let Some(&(_, gpa)) = self.cache.iter().find(|(v, _)| *v == gva_page) {
            return Some(gpa);
        }
        let gpa = translate(self.mem, &self.paging, gva_page).ok()?;
        self.cache[self.next] = (gva_page, gpa);
        self.next = (self.next + 1) % self.cache.len();
        Some(gpa)
    }

    /// Fills `buf` from guest virtual address `gva` (it may span pages);
    /// `false` when any part is unmapped or outside guest RAM.
    pub fn read(&mut self, gva: u64, buf: &mut [u8]) -> bool {
        let mut done = 0usize;
        while done < buf.len() {
            let Some(addr) = gva.checked_add(done as u64) else {
                return false;
            };
            let offset = addr % PAGE_SIZE;
            let chunk = ((PAGE_SIZE - offset) as usize).min(buf.len() - done);
            let Some(page) = self.page(addr - offset) else {
                return false;
            };
            if !self
                .mem
                .read_phys(page + offset, &mut buf[done..done + chunk])
            {
                return false;
            }
            done += chunk;
        }
        true
    }

    /// The little-endian u64 at `gva`.
    pub fn read_u64(&mut self, gva: u64) -> Option<u64> {
        let mut raw = [0u8; 8];
        self.read(gva, &mut raw).then(|| u64::from_le_bytes(raw))
    }
}

/// The most frames one walk records (the leaf included); deeper chains are
/// cut there.
pub const MAX_FRAMES: usize = 128;

/// Where `pt_regs` keeps what the walk needs (x86-64 Linux, `struct
/// pt_regs`: r15 r14 r13 r12 bp bx r11 r10 r9 r8 ax cx dx si di orig_ax ip
/// cs flags sp ss).
const PT_REGS_BP: u64 = 4 * 8;
const PT_REGS_IP: u64 = 16 * 8;
const PT_REGS_CS: u64 = 17 * 8;

/// Walks a kernel call chain from frame pointer `rbp`, appending to
/// `frames` (which holds the leaf already) one address per caller: the
/// return address minus one (inside the call instruction, so a call that
/// ends a function names that function), or, across an interrupt or
/// exception frame, the interrupted instruction itself.
///
/// The frame layout is the one `-fno-omit-frame-pointer` gives: `[rbp]` is
/// the caller's rbp, `[rbp + 8]` the return address. Linux marks an entry
/// from an interrupt or exception by setting bit 0 of rbp
/// (`ENCODE_FRAME_POINTER`): rbp & ~1 is then the `pt_regs`, and the walk
/// goes on from the interrupted context's ip and bp if that was kernel
/// code, and ends if it was user code. The walk ends at a zero or
/// misaligned frame pointer, an unreadable frame, a return address that
/// `is_text` refuses, a frame already visited (a loop), or at
/// [`MAX_FRAMES`].
pub fn walk_frames<M: GuestPhys + ?Sized>(
    view: &mut GuestView<'_, M>,
    rbp: u64,
    is_text: impl Fn(u64) -> bool,
    frames: &mut Vec<u64>,
) {
    let mut visited = [0u64; MAX_FRAMES];
    let mut nvisited = 0usize;
    let mut bp = rbp;
    while frames.len() < MAX_FRAMES {
        if bp == 0 || visited[..nvisited].contains(&bp) {
            return;
        }
        visited[nvisited] = bp;
        nvisited += 1;
        if bp & 7 == 1 {
            let regs = bp & !1;
            let (Some(ip), Some(cs), Some(next)) = (
                view.read_u64(regs.wrapping_add(PT_REGS_IP)),
                view.read_u64(regs.wrapping_add(PT_REGS_CS)),
                view.read_u64(regs.wrapping_add(PT_REGS_BP)),
            ) else {
                return;
            };
            if cs & 3 != 0 || !is_text(ip) {
                // Entered from user mode: the kernel stack ends here.
                return;
            }
            frames.push(ip);
            bp = next;
            continue;
        }
        if bp & 7 != 0 {
            return;
        }
        let (Some(next), Some(ret)) = (view.read_u64(bp), view.read_u64(bp.wrapping_add(8))) else {
            return;
        };
        if ret == 0 || !is_text(ret) {
            return;
        }
        frames.push(ret - 1);
        bp = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest memory image with page tables built by hand.
    struct Image {
        mem: Vec<u8>,
        next_table: u64,
    }

    const PML4: u64 = 0x1000;

    impl Image {
        fn new(size: usize) -> Self {
            Self {
                mem: vec![0; size],
                next_table: PML4 + 0x1000,
            }
        }
        fn w64(&mut self, gpa: u64, v: u64) {
            let a = gpa as usize;
            self.mem[a..a + 8].copy_from_slice(&v.to_le_bytes());
        }
        fn r64(&self, gpa: u64) -> u64 {
            let a = gpa as usize;
            u64::from_le_bytes(self.mem[a..a + 8].try_into().unwrap())
        }
        fn table(&mut self) -> u64 {
            let t = self.next_table;
            self.next_table += 0x1000;
            t
        }
        /// The table `entry` points to, made if absent.
        fn child(&mut self, table: u64, index: u64) -> u64 {
            let e = self.r64(table + index * 8);
            if e & 1 != 0 {
                return e & PTE_ADDR;
            }
            let t = self.table();
            self.w64(table + index * 8, t | 3);
            t
        }
        /// Maps `gva` to `gpa` with a page of `size` (4K, 2M or 1G).
        fn map(&mut self, gva: u64, gpa: u64, size: u64) {
            let pdpt = self.child(PML4, (gva >> 39) & 0x1ff);
            if size == 1 << 30 {
                self.w64(pdpt + ((gva >> 30) & 0x1ff) * 8, gpa | 0x83);
                return;
            }
            let pd = self.child(pdpt, (gva >> 30) & 0x1ff);
            if size == 2 << 20 {
                self.w64(pd + ((gva >> 21) & 0x1ff) * 8, gpa | 0x83);
                return;
            }
            let pt = self.child(pd, (gva >> 21) & 0x1ff);
            // NX and a software bit set: masked off.
            self.w64(
                pt + ((gva >> 12) & 0x1ff) * 8,
                gpa | 3 | (1 << 63) | (1 << 52),
            );
        }
    }

    const KERNEL: u64 = 0xffff_ffff_8000_0000;

    #[test]
    fn translates_4k_2m_and_1g_pages() {
        let mut img = Image::new(8 << 20);
        img.map(KERNEL, 0, 1 << 30); // 1 GiB page
        img.map(0xffff_8880_0020_0000, 0x20_0000, 2 << 20); // 2 MiB page
        img.map(0x7fff_0000_1000, 0x30_5000, 4096); // 4 KiB page
        let p = Paging::long_mode(PML4 | 0x18); // PWT/PCD bits ignored
        let m = img.mem.as_slice();
        assert_eq!(translate(m, &p, KERNEL + 0x12_3456), Ok(0x12_3456));
        assert_eq!(
            translate(m, &p, 0xffff_8880_0021_2345),
            Ok(0x20_0000 + 0x1_2345)
        );
        assert_eq!(translate(m, &p, 0x7fff_0000_1abc), Ok(0x30_5abc));
        assert_eq!(
            translate(m, &p, 0x7fff_0000_2000),
            Err(Fault::NotPresent),
            "next 4K page unmapped"
        );
        assert_eq!(translate(m, &p, 0x1000), Err(Fault::NotPresent));
        assert_eq!(
            translate(m, &p, 0x8000_0000_0000_0000),
            Err(Fault::NonCanonical)
        );
        // Paging off: identity. 32-bit paging and 5-level: not walked.
        assert_eq!(translate(m, &Paging::off(), 0x1234), Ok(0x1234));
        let mut no_lm = p;
        no_lm.efer = 0;
        assert_eq!(translate(m, &no_lm, KERNEL), Err(Fault::Unsupported));
        let mut la57 = p;
        la57.cr4 |= CR4_LA57;
        assert_eq!(translate(m, &la57, KERNEL), Err(Fault::Unsupported));
    }

    #[test]
    fn hostile_page_tables_fail_cleanly() {
        let mut img = Image::new(1 << 20);
        let m_len = img.mem.len() as u64;
        // PML4 entries pointing outside RAM, at the very top of the
        // physical address space, and at itself (a self-map).
        img.w64(PML4, 0x000f_ffff_ffff_f000 | 3);
        img.w64(PML4 + 8, (m_len + 0x1000) | 3);
        img.w64(PML4 + 16, PML4 | 3);
        // A present 1 GiB page whose target is outside RAM.
        img.map(KERNEL, 0x40_0000_0000, 1 << 30);
        let p = Paging::long_mode(PML4);
        let m = img.mem.as_slice();
        assert_eq!(translate(m, &p, 0), Err(Fault::OutsideRam));
        assert_eq!(translate(m, &p, 1 << 39), Err(Fault::OutsideRam));
        // The self-map walks PML4 as every level: entry 2 again, then
        // entry 2 as a 4K page: lands inside the image, no loop.
        assert!(translate(m, &p, (2 << 39) | (2 << 30) | (2 << 21) | (2 << 12)).is_ok());
        let mut view = GuestView::new(m, p);
        assert_eq!(view.read_u64(KERNEL), None, "target outside RAM");
        // CR3 outside RAM.
        let bad = Paging::long_mode(0xffff_f000);
        assert_eq!(translate(m, &bad, KERNEL), Err(Fault::OutsideRam));
        // Reads near the end of the address space do not overflow.
        let mut flat = GuestView::new(m, Paging::off());
        let mut buf = [0u8; 16];
        assert!(!flat.read(u64::MAX - 3, &mut buf));
        assert!(!flat.read(m_len - 4, &mut buf));
        assert!(flat.read(m_len - 16, &mut buf));
    }

    #[test]
    fn reads_across_a_page_boundary_follow_each_page() {
        let mut img = Image::new(4 << 20);
        // Two adjacent virtual pages on non-adjacent physical pages.
        img.map(0x40_0000, 0x30_0000, 4096);
        img.map(0x40_1000, 0x20_0000, 4096);
        img.w64(0x30_0ff8, 0x1111_1111_1111_1111);
        img.mem[0x20_0000..0x20_0004].copy_from_slice(&[0xaa, 0xbb, 0xcc, 0xdd]);
        let m = img.mem.as_slice();
        let mut view = GuestView::new(m, Paging::long_mode(PML4));
        let mut buf = [0u8; 12];
        assert!(view.read(0x40_0ff8, &mut buf));
        assert_eq!(&buf[..8], &[0x11; 8]);
        assert_eq!(&buf[8..], &[0xaa, 0xbb, 0xcc, 0xdd]);
        assert!(!view.read(0x40_1ffc, &mut buf), "second page unmapped");
    }

    /// Kernel text for the frame-walk tests.
    const TEXT: std::ops::Range<u64> = 0xffff_ffff_8100_0000..0xffff_ffff_8200_0000;
    const STACK: u64 = 0xffff_c900_0000_0000;
    const STACK_PHYS: u64 = 0x20_0000;

    fn stack_image() -> Image {
        let mut img = Image::new(4 << 20);
        img.map(STACK, STACK_PHYS, 2 << 20);
        img
    }

    fn frame(img: &mut Image, at: u64, next_bp: u64, ret: u64) {
        img.w64(STACK_PHYS + (at - STACK), next_bp);
        img.w64(STACK_PHYS + (at - STACK) + 8, ret);
    }

    fn walk(img: &Image, rbp: u64) -> Vec<u64> {
        let mut view = GuestView::new(img.mem.as_slice(), Paging::long_mode(PML4));
        let mut frames = vec![TEXT.start + 1];
        walk_frames(&mut view, rbp, |a| TEXT.contains(&a), &mut frames);
        frames
    }

    #[test]
    fn walks_a_frame_chain_to_its_end() {
        let mut img = stack_image();
        frame(&mut img, STACK + 0x100, STACK + 0x140, TEXT.start + 0x20);
        frame(&mut img, STACK + 0x140, STACK + 0x200, TEXT.start + 0x300);
        frame(&mut img, STACK + 0x200, 0, TEXT.start + 0x4000);
        assert_eq!(
            walk(&img, STACK + 0x100),
            [
                TEXT.start + 1,
                TEXT.start + 0x1f,
                TEXT.start + 0x2ff,
                TEXT.start + 0x3fff
            ]
        );
    }

    #[test]
    fn follows_an_interrupt_frame_into_kernel_code_and_stops_at_user_mode() {
        let mut img = stack_image();
        let regs = STACK + 0x800;
        // Handler frame whose saved rbp is an encoded pt_regs pointer.
        frame(&mut img, STACK + 0x100, regs | 1, TEXT.start + 0x50);
        let r = STACK_PHYS + 0x800;
        img.w64(r + PT_REGS_IP, TEXT.start + 0x777);
        img.w64(r + PT_REGS_CS, 0x10);
        img.w64(r + PT_REGS_BP, STACK + 0x900);
        frame(&mut img, STACK + 0x900, 0, TEXT.start + 0x999);
        assert_eq!(
            walk(&img, STACK + 0x100),
            [
                TEXT.start + 1,
                TEXT.start + 0x4f,
                TEXT.start + 0x777,
                TEXT.start + 0x998
            ]
        );
        // The same frame interrupting user mode (cs 0x33): the walk ends.
        img.w64(r + PT_REGS_CS, 0x33);
        assert_eq!(
            walk(&img, STACK + 0x100),
            [TEXT.start + 1, TEXT.start + 0x4f]
        );
    }

    #[test]
    fn hostile_frame_chains_end_cleanly() {
        // A loop of two frames.
        let mut img = stack_image();
        frame(&mut img, STACK + 0x100, STACK + 0x200, TEXT.start + 0x10);
        frame(&mut img, STACK + 0x200, STACK + 0x100, TEXT.start + 0x20);
        let f = walk(&img, STACK + 0x100);
        assert_eq!(f.len(), 3, "{f:x?}");
        // A frame pointing at itself.
        frame(&mut img, STACK + 0x300, STACK + 0x300, TEXT.start + 0x30);
        assert_eq!(walk(&img, STACK + 0x300).len(), 2);
        // Unmapped, misaligned, non-canonical and zero frame pointers.
        frame(
            &mut img,
            STACK + 0x400,
            0xffff_c900_4000_0000,
            TEXT.start + 0x40,
        );
        assert_eq!(walk(&img, STACK + 0x400).len(), 2);
        frame(&mut img, STACK + 0x500, STACK + 0x603, TEXT.start + 0x50);
        assert_eq!(walk(&img, STACK + 0x500).len(), 2);
        frame(
            &mut img,
            STACK + 0x700,
            0x8000_0000_0000_0000,
            TEXT.start + 0x70,
        );
        assert_eq!(walk(&img, STACK + 0x700).len(), 2);
        assert_eq!(walk(&img, 0).len(), 1);
        assert_eq!(walk(&img, u64::MAX - 7).len(), 1);
        // A return address outside kernel text ends the walk there.
        frame(&mut img, STACK + 0x800, STACK + 0x900, 0x4000_1234);
        frame(&mut img, STACK + 0x900, 0, TEXT.start + 0x90);
        assert_eq!(walk(&img, STACK + 0x800).len(), 1);
        // An encoded pt_regs pointer that is unmapped, or that points
        // back at an already visited frame.
        frame(
            &mut img,
            STACK + 0xa00,
            0xffff_c900_4000_0001,
            TEXT.start + 0xa0,
        );
        assert_eq!(walk(&img, STACK + 0xa00).len(), 2);
        // A chain deeper than the cap: cut at MAX_FRAMES.
        let n = 3 * MAX_FRAMES as u64;
        for i in 0..n {
            let at = STACK + 0x1_0000 + i * 16;
            frame(&mut img, at, at + 16, TEXT.start + i);
        }
        let f = walk(&img, STACK + 0x1_0000);
        assert_eq!(f.len(), MAX_FRAMES);
        // Frames of every possible value in a random-looking region.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for off in (0..0x1000).step_by(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            img.w64(STACK_PHYS + 0x2_0000 + off, x);
        }
        for off in (0..0x1000).step_by(8) {
            let f = walk(&img, STACK + 0x2_0000 + off);
            assert!(f.len() <= MAX_FRAMES);
        }
    }
}
